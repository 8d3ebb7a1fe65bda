## The weight gradient as a GEMM (weight_grad_gemm.py derives the layout).
##
## dw[k, c, kh, kw] = sum over n, oh, ow of dy[n, k, oh, ow] * xs[n, c, oh * cols + ow +
## tap offset(kh, kw)], xs being the staged grid of the forward's implicit GEMM (or the input
## itself when nothing needs staging). Each work-item holds tk output channels x tn
## (c, kh, kw) columns, one accumulator vector of tw output positions each, and sums its
## share of the batch * out_height rows, a row in whole vectors, then (when the row is not a
## whole number of them) one vector whose lanes past the row's end are zero in dy (staged
## with zero columns) and cleared in x. With splits > 1 the shares are partial sums in acc_t that sum_splits adds
## up in a fixed order.
##
## Global range: (column blocks, groups * channel blocks, splits), rounded up to the
## work-group size; the surplus work-items return at once (no barriers).
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    KHW = KH * KW
    N = cin_g * KHW
    g_cols, cstride = layout.grid.cols, layout.grid.channel_stride
    d_pitch, d_plane = layout.dy_grid.cols, layout.dy_grid.plane
    full, rem = layout.full, layout.rem
    k_blocks, ragged_k = channel_blocks.count, channel_blocks.ragged
    n_blocks, ragged_n = column_blocks.count, column_blocks.ragged
    accv = acc_t + (str(tw) if tw > 1 else '')
    maskv = ('long' if acc_t == 'double' else 'int') + (str(tw) if tw > 1 else '')
    mask = '(%s)(%s)' % (maskv, ', '.join('-1' if j < rem else '0' for j in range(tw)))
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;
__constant int tap_offsets[${KHW}] = {${', '.join(map(str, layout.tap_offsets))}};

## One step at position p of the row: tk dy vectors d<t> (already loaded) times tn x vectors.
<%def name="fma_step(x_vector)">
% for j in range(tn):
            {
                const ${accv} xv = ${x_vector(j)};
% for t in range(tk):
                acc${t}_${j} += d${t} * xv;
% endfor
            }
% endfor
</%def>

<%def name="x_whole(j)">${c.load_vec(storage_t, tw, 'x%d' % j, 'px + p')}</%def>
<%def name="x_masked(j)">${masked(capture(c.load_vec, storage_t, tw, 'x%d' % j, 'px + p'))}</%def>
## v with the lanes past the row cleared: a bitwise and (PoCL's select() is a call).
<%def name="masked(v)">as_${accv}(as_${maskv}(${v}) & ${mask})</%def>

## The sums of output row oh: whole vectors, then the row's last one (dy staged with zeros
## past the row; x's lanes there cleared).
<%def name="row_sums()">
            const int px = oh * ${g_cols};
            const int pd = oh * ${d_pitch};
            for (int v = 0; v < ${full}; ++v) {
                const int p = v * ${tw};
% for t in range(tk):
                const ${accv} d${t} = ${c.load_vec(storage_t, tw, 'dy%d' % t, 'pd + p')};
% endfor
${fma_step(x_whole)}
            }
% if rem:
            {
                const int p = ${full * tw};
% for t in range(tk):
                const ${accv} d${t} = ${c.load_vec(storage_t, tw, 'dy%d' % t, 'pd + p')};
% endfor
${fma_step(x_masked)}
            }
% endif
</%def>

__kernel void weight_grad_gemm(
    ${parameters})
{
    const int nb = get_global_id(0);
    const int kb = get_global_id(1);
    const int split = get_global_id(2);
    if (nb >= ${n_blocks} || kb >= ${groups * k_blocks} || split >= ${splits})
        return;
    const int g = kb / ${k_blocks};
    const int k0 = (kb - g * ${k_blocks}) * ${tk};
    const int n0 = nb * ${tn};
% for j in range(tn):
    const int col${j} = ${'min(n0 + %d, %d)' % (j, N - 1) if ragged_n else 'n0 + %d' % j};
    const int ci${j} = col${j} / ${KHW};
    const idx_t xo${j} = (idx_t)ci${j} * ${cstride} + tap_offsets[col${j} - ci${j} * ${KHW}];
% endfor
% for t in range(tk):
    const int ch${t} = g * ${cout_g} + ${'min(k0 + %d, %d)' % (t, cout_g - 1) if ragged_k else 'k0 + %d' % t};
% for j in range(tn):
    ${accv} acc${t}_${j} = (${accv})0;
% endfor
% endfor
    // This work-item's share of the batch * out_height rows, image by image.
    const int rows = batch * ${h_out};
    const int per_split = (rows + ${splits - 1}) / ${splits};
    const int row_end = min(rows, (split + 1) * per_split);
    for (int row = split * per_split; row < row_end; ) {
        const int n = row / ${h_out};
        const int oh0 = row - n * ${h_out};
        const int oh1 = min(${h_out}, oh0 + row_end - row);
        row += oh1 - oh0;
        __global const ${storage_t} *xn = x + x_off + ((idx_t)n * ${cin} + g * ${cin_g}) * ${cstride};
% for j in range(tn):
        __global const ${storage_t} *x${j} = xn + xo${j};
% endfor
% for t in range(tk):
        __global const ${storage_t} *dy${t} = dy + dy_off + ((idx_t)n * ${cout} + ch${t}) * ${d_plane};
% endfor
        for (int oh = oh0; oh < oh1; ++oh) {
${row_sums()}
        }
    }

% for t in range(tk):
% for j in range(tn):
    ${'if (k0 + %d < %d%s)' % (t, cout_g, ' && n0 + %d < %d' % (j, N) if ragged_n else '') if ragged_k else ('if (n0 + %d < %d)' % (j, N) if ragged_n else '')} {
        ${c.lane_total('sum', 'acc%d_%d' % (t, j), tw, acc_t)}
        ${c.store_vec(out_t, 1, 'sum', 'dw', 'dw_off + ((idx_t)split * %d + ch%d) * %d + col%d' % (cout, t, N, j))};
    }
% endfor
% endfor
}
