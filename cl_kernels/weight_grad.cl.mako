## The gradient of a convolution with respect to its weight.
##
## dw[k, c, kh, kw] = sum over n, oh, ow of dy[n, k, oh, ow] * x_p[n, c, oh*SH + kh*DH,
## ow*SW + kw*DW], x_p being the input under the padding mode (read through the index map,
## never materialised). Each work-item owns tk output channels at one (c, kh, kw) and sums
## a share of the batch * out_height rows, tw output columns at a time (explicit vectors,
## summed across lanes at the end). With splits > 1 the shares are partial sums in acc_t that
## sum_splits adds up in a fixed order, so results are deterministic.
##
## Global range: (cin_g * KH * KW, groups * channel blocks, splits).
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    SH, SW = stride
    DH, DW = dilation
    PT, PB, PL, PR = pad
    KHW = KH * KW
    k_blocks, ragged_k = channel_blocks.count, channel_blocks.ragged
    full_cols = column_vectors.whole    # columns covered by whole vectors
    accv = acc_t + (str(tw) if tw > 1 else '')
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

## Lane j of the input under output column ow0 + j, on a tile that may reach the padding.
<%def name="x_lane(j)">\
% if padding_mode == 'zeros':
((uint)(iw0 + ${j * SW}) < ${width}u ? LOAD(xr, clamp(iw0 + ${j * SW}, 0, ${width - 1})) : (${acc_t})0)\
% else:
LOAD(xr, ${c.padded_index(padding_mode, 'iw0 + %d' % (j * SW), width)})\
% endif
</%def>

<%def name="x_vector()">\
% if SW == 1:
${c.load_vec(storage_t, tw, 'xr', 'iw0')}\
% else:
(${accv})(${', '.join('LOAD(xr, iw0 + %d)' % (j * SW) for j in range(tw))})\
% endif
</%def>

__kernel void conv2d_weight_grad(
    ${parameters})
{
    const int ckk = get_global_id(0);
    const int kb = get_global_id(1);
    const int split = get_global_id(2);
    if (ckk >= ${cin_g * KHW} || kb >= ${groups * k_blocks} || split >= ${splits})
        return;
    const int ci = ckk / ${KHW};
    const int kh = (ckk - ci * ${KHW}) / ${KW};
    const int kw = ckk - ci * ${KHW} - kh * ${KW};
    const int g = kb / ${k_blocks};
    const int k0 = (kb - g * ${k_blocks}) * ${tk};
    // This work-item's share of the batch * out_height rows.
    const int rows = batch * ${h_out};
    const int per_split = (rows + ${splits - 1}) / ${splits};
    const int row_end = min(rows, (split + 1) * per_split);
% for t in range(tk):
% if ragged_k:
    const int ch${t} = g * ${cout_g} + min(k0 + ${t}, ${cout_g - 1});
% else:
    const int ch${t} = g * ${cout_g} + k0 + ${t};
% endif
    ${accv} acc${t} = (${accv})0;
% if full_cols < w_out:
    ${acc_t} tail${t} = 0;
% endif
% endfor

    for (int row = split * per_split; row < row_end; ++row) {
        const int n = row / ${h_out};
        const int oh = row - n * ${h_out};
% if padding_mode == 'zeros':
        const int ih = oh * ${SH} + kh * ${DH} - ${PT};
        if ((uint)ih >= ${height}u) continue;
% else:
        const int ihp = oh * ${SH} + kh * ${DH} - ${PT};
        const int ih = ${c.padded_index(padding_mode, 'ihp', height)};
% endif
        __global const ${storage_t} *xr = x + x_off + (((idx_t)n * ${cin} + g * ${cin_g} + ci) * ${height} + ih) * ${width};
% for t in range(tk):
        __global const ${storage_t} *dyr${t} = dy + dy_off + (((idx_t)n * ${cout} + ch${t}) * ${h_out} + oh) * ${w_out};
% endfor
        for (int ow0 = 0; ow0 < ${full_cols}; ow0 += ${tw}) {
            const int iw0 = ow0 * ${SW} + kw * ${DW} - ${PL};
            ${accv} xv;
            if (iw0 >= 0 && iw0 + ${(tw - 1) * SW} < ${width})
                xv = ${x_vector()};
            else
                xv = (${accv})(${', '.join(capture(x_lane, j) for j in range(tw))});
% for t in range(tk):
            acc${t} += ${c.load_vec(storage_t, tw, 'dyr%d' % t, 'ow0')} * xv;
% endfor
        }
% if full_cols < w_out:
        for (int ow = ${full_cols}; ow < ${w_out}; ++ow) {
            const int iw0 = ow * ${SW} + kw * ${DW} - ${PL};
            const ${acc_t} xs = ${x_lane(0)};
% for t in range(tk):
            tail${t} += LOAD(dyr${t}, ow) * xs;
% endfor
        }
% endif
    }

% for t in range(tk):
% if ragged_k:
    if (k0 + ${t} < ${cout_g}) {
% else:
    {
% endif
        ${c.lane_total('sum', 'acc%d' % t, tw, acc_t, ' + tail%d' % t if full_cols < w_out else '')}
        ${c.store_vec(out_t, 1, 'sum', 'dw', 'dw_off + ((idx_t)split * %d + ch%d) * %d + ckk' % (cout, t, cin_g * KHW))};
    }
% endfor
}
