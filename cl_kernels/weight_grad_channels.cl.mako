## The weight gradient as a GEMM vectorised along output channels (weight_grad_channels.py
## derives the layout).
##
## Each build renders one kernel, `entry`:
## transpose_dy: dyt[n][g][p][kk] = dy[n][g * cout_g + kk][p] as acc_t, zero for the padded
## channels kk >= cout_g. Global range: (positions, batch * groups).
##
## weight_grad_channels: dw[k, c, kh, kw] = sum over n, oh, ow of dyt[n][g][p][k] *
## xs[n, c, oh * cols + ow + tap offset(kh, kw)] (p = oh * w_out + ow), xs being the forward's
## staged grid (or the input itself). Each work-item holds tv vectors of tw output channels x
## tn (c, kh, kw) columns and sums its share of the batch * out_height rows, position by
## position: tv dense dyt vectors, one broadcast x value per column. With splits > 1 the
## shares are partial sums in acc_t that sum_splits adds up in a fixed order.
## Global range: (column blocks, groups * channel blocks, splits), rounded up to the
## work-group size; the surplus work-items return at once (no barriers).
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    KHW = KH * KW
    N = cin_g * KHW
    g_cols, cstride = layout.grid.cols, layout.grid.channel_stride
    P, padded = layout.positions, layout.padded
    k_blocks, ragged_k = channel_blocks.count, channel_blocks.ragged
    n_blocks, ragged_n = column_blocks.count, column_blocks.ragged
    accv = acc_t + (str(tw) if tw > 1 else '')
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;
__constant int tap_offsets[${KHW}] = {${', '.join(map(str, layout.tap_offsets))}};

% if entry == 'transpose_dy':
__kernel void transpose_dy(
    ${parameters})
{
    const int p = get_global_id(0);
    const int ng = get_global_id(1);
    if (p >= ${P} || ng >= batch * ${groups})
        return;
    // Image n, group g: dy's channels g * cout_g ... are consecutive planes.
    __global const ${storage_t} *src = dy + dy_off + (idx_t)ng * ${cout_g * P} + p;
    __global ${acc_t} *dst = dyt + dyt_off + ((idx_t)ng * ${P} + p) * ${padded};
    for (int k = 0; k < ${cout_g}; ++k)
        dst[k] = LOAD(src, (idx_t)k * ${P});
    for (int k = ${cout_g}; k < ${padded}; ++k)
        dst[k] = 0;
}
% else:
__kernel void weight_grad_channels(
    ${parameters})
{
    const int nb = get_global_id(0);
    const int kb = get_global_id(1);
    const int split = get_global_id(2);
    if (nb >= ${n_blocks} || kb >= ${groups * k_blocks} || split >= ${splits})
        return;
    const int g = kb / ${k_blocks};
    const int k0 = (kb - g * ${k_blocks}) * ${tv * tw};
    const int n0 = nb * ${tn};
% for j in range(tn):
    const int col${j} = ${'min(n0 + %d, %d)' % (j, N - 1) if ragged_n else 'n0 + %d' % j};
    const int ci${j} = col${j} / ${KHW};
    const idx_t xo${j} = (idx_t)ci${j} * ${cstride} + tap_offsets[col${j} - ci${j} * ${KHW}];
% endfor
% for v in range(tv):
% for j in range(tn):
    ${accv} acc${v}_${j} = (${accv})0;
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
        __global const ${acc_t} *dn = dyt + dyt_off + ((idx_t)n * ${groups} + g) * ${P * padded} + k0;
        for (int oh = oh0; oh < oh1; ++oh) {
            for (int ow = 0; ow < ${w_out}; ++ow) {
                const int px = oh * ${g_cols} + ow;
                __global const ${acc_t} *dp = dn + (oh * ${w_out} + ow) * ${padded};
% for v in range(tv):
                const ${accv} d${v} = ${c.load_vec(acc_t, tw, 'dp', v * tw)};
% endfor
% for j in range(tn):
                {
                    const ${acc_t} xv = LOAD(x${j}, px);
% for v in range(tv):
                    acc${v}_${j} += d${v} * xv;
% endfor
                }
% endfor
            }
        }
    }

% for v in range(tv):
% for j in range(tn):
% for l in range(tw):
<% k = v * tw + l %>\
% if ragged_k or ragged_n:
    if (${' && '.join(([('k0 + %d < %d' % (k, cout_g))] if ragged_k else []) + ([('n0 + %d < %d' % (j, N))] if ragged_n else []))})
% endif
        ${c.store_vec(out_t, 1, capture(c.lane, 'acc%d_%d' % (v, j), tw, l), 'dw', 'dw_off + ((idx_t)split * %d + g * %d + k0 + %d) * %d + col%d' % (cout, cout_g, k, N, j))};
% endfor
% endfor
% endfor
}
% endif
