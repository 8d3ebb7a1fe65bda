## The gradient of a convolution with respect to its input (a transposed convolution).
##
## dx_p[n, c, q] = sum over output channels k of the group, kh, kw of
##     dy[n, k, oh, ow] * w[k, c, kh, kw]   where q = (oh*SH + kh*DH, ow*SW + kw*DW)
## in padded-input coordinates. Each work-item gathers a tile of tc input channels x tw
## consecutive columns of one row (one explicit vector), so nothing is written twice and no
## atomics are needed. The target is either the input gradient itself (padding 'zeros': only
## the rows and columns inside the input; target offset = the padding) or, for the other
## padding modes, the whole padded plane, which fold_padding then adds onto the input
## positions each padded position was read from.
##
## Global range: (column tiles, batch * target rows, groups * channel blocks), rounded up to
## the work-group size; surplus work-items return at once (no barriers).
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    SH, SW = stride
    DH, DW = dilation
    KHW = KH * KW
    c_blocks, ragged_c = channel_blocks.count, channel_blocks.ragged
    s_tiles, ragged_s = column_tiles.count, column_tiles.ragged
    accv = acc_t + (str(tw) if tw > 1 else '')
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

## Lane j of dy's row for kernel column kw, zero where no output column reads it.
<%def name="dy_lane(j)">\
% if SW == 1:
((uint)(ow0 + ${j}) < ${w_out}u ? LOAD(dyr, clamp(ow0 + ${j}, 0, ${w_out - 1})) : (${acc_t})0)\
% else:
(qw + ${j} >= 0 && (qw + ${j}) % ${SW} == 0 && (qw + ${j}) / ${SW} < ${w_out} ? LOAD(dyr, clamp((qw + ${j}) / ${SW}, 0, ${w_out - 1})) : (${acc_t})0)\
% endif
</%def>

<%def name="accumulate(interior)">
    for (int k = 0; k < ${cout_g}; ++k) {
        __global const ${storage_t} *dyk = dy + dy_off + ((idx_t)n * ${cout} + g * ${cout_g} + k) * ${h_out * w_out};
        __global const ${storage_t} *wk = w + w_off + (idx_t)(g * ${cout_g} + k) * ${cin_g * KHW};
        #pragma unroll
        for (int kh = 0; kh < ${KH}; ++kh) {
            const int qh = q_row - kh * ${DH};
% if SH == 1:
            if ((uint)qh >= ${h_out}u) continue;
            __global const ${storage_t} *dyr = dyk + qh * ${w_out};
% else:
            if (qh < 0 || qh % ${SH} != 0 || qh / ${SH} >= ${h_out}) continue;
            __global const ${storage_t} *dyr = dyk + (qh / ${SH}) * ${w_out};
% endif
            for (int kw = 0; kw < ${KW}; ++kw) {
% if SW == 1:
                const int ow0 = q_col - kw * ${DW};
% else:
                const int qw = q_col - kw * ${DW};
% endif
% if interior:
                const ${accv} dv = ${c.load_vec(storage_t, tw, 'dyr', 'ow0')};
% else:
                const ${accv} dv = (${accv})(${', '.join(capture(dy_lane, j) for j in range(tw))});
% endif
% for t in range(tc):
                acc${t} += LOAD(wk, w${t} + kh * ${KW} + kw) * dv;
% endfor
            }
        }
    }
</%def>

__kernel void conv2d_input_grad(
    ${parameters})
{
    const int tile = get_global_id(0);
    const int row = get_global_id(1);
    const int cb = get_global_id(2);
    if (tile >= ${s_tiles} || row >= batch * ${rows} || cb >= ${groups * c_blocks})
        return;
    const int n = row / ${rows};
    const int r = row - n * ${rows};
    const int g = cb / ${c_blocks};
    const int c0 = (cb - g * ${c_blocks}) * ${tc};
    const int s0 = tile * ${tw};
    // Padded-input coordinates of the tile's row and first column.
    const int q_row = r + ${row0};
    const int q_col = s0 + ${col0};
% for t in range(tc):
% if ragged_c:
    const int w${t} = min(c0 + ${t}, ${cin_g - 1}) * ${KHW};
% else:
    const int w${t} = (c0 + ${t}) * ${KHW};
% endif
    ${accv} acc${t} = (${accv})0;
% endfor

% if SW == 1:
    if (q_col - ${(KW - 1) * DW} >= 0 && q_col + ${tw - 1} < ${w_out}) {
${accumulate(True)}
    } else {
${accumulate(False)}
    }
% else:
${accumulate(False)}
% endif

% for t in range(tc):
% if ragged_c:
    if (c0 + ${t} < ${cin_g}) {
% else:
    {
% endif
        const idx_t i = dx_off + (((idx_t)n * ${cin} + g * ${cin_g} + c0 + ${t}) * ${rows} + r) * ${cols} + s0;
% if ragged_s:
        if (s0 + ${tw} <= ${cols}) {
            ${c.store_vec(out_t, tw, 'acc%d' % t, 'dx', 'i')};
        } else {
% for j in range(tw):
            if (s0 + ${j} < ${cols}) ${c.store_vec(out_t, 1, capture(c.lane, 'acc%d' % t, tw, j), 'dx', 'i + %d' % j)};
% endfor
        }
% else:
        ${c.store_vec(out_t, tw, 'acc%d' % t, 'dx', 'i')};
% endif
    }
% endfor
}
