## Register-tiled direct convolution.
##
## One work-item computes a tile of tk output channels x tw consecutive output pixels of one
## output row; the tw pixels are one explicit vector (PoCL vectorises explicit vectors, not
## work-items). Everything static is a constant here, so index maths folds and loops unroll.
## The padding mode is applied where the input is read; nothing padded is materialised.
##
## Global range: (width tiles, batch * out_height, groups * channel blocks), rounded up to the
## work-group size; the surplus work-items return at once (the kernel has no barriers).
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    SH, SW = stride
    DH, DW = dilation
    PT, PB, PL, PR = pad
    KHW = KH * KW
    k_blocks, ragged_k = channel_blocks.count, channel_blocks.ragged
    w_tiles, ragged_w = column_tiles.count, column_tiles.ragged
    accv = acc_t + (str(tw) if tw > 1 else '')
    last_col = (tw - 1) * SW + (KW - 1) * DW   # offset of the tile's last input column
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

<%def name="row_index(kh)">\
% if padding_mode == 'zeros':
        const int ih = ih0 + ${kh} * ${DH};
        if ((uint)ih >= ${height}u) continue;
% else:
        const int ihp = ih0 + ${kh} * ${DH};
        const int ih = ${c.padded_index(padding_mode, 'ihp', height)};
% endif
</%def>

## The input vector under kernel column kw for the tile, when the whole tile is inside.
<%def name="interior_load()">\
% if SW == 1:
${c.load_vec(storage_t, tw, 'xr', 'iw0 + kw * %d' % DW)}\
% else:
(${accv})(${', '.join('LOAD(xr, iw0 + kw * %d + %d)' % (DW, j * SW) for j in range(tw))})\
% endif
</%def>

<%def name="accumulate(interior)">
    for (int ci = 0; ci < ${cin_g}; ++ci) {
        __global const ${storage_t} *xc = xg + (idx_t)ci * ${height * width};
% for t in range(tk):
        __global const ${storage_t} *w${t} = w + wrow${t} + ci * ${KHW};
% endfor
        #pragma unroll
        for (int kh = 0; kh < ${KH}; ++kh) {
${row_index('kh')}\
            __global const ${storage_t} *xr = xc + ih * ${width};
% if unroll_kw:
            #pragma unroll
% endif
            for (int kw = 0; kw < ${KW}; ++kw) {
% if interior:
                const ${accv} xv = ${interior_load()};
% else:
                const int iwk = iw0 + kw * ${DW};
                const ${accv} xv = (${accv})(${', '.join(capture(c.padded_load, padding_mode, acc_t, 'xr', 'iwk + %d' % (j * SW), width) for j in range(tw))});
% endif
% for t in range(tk):
                acc${t} += LOAD(w${t}, kh * ${KW} + kw) * xv;
% endfor
            }
        }
    }
</%def>

## Store the tile's channel t (n lanes from lane j0, at output index i).
<%def name="epilogue(t, n, i, j0=0)">\
${c.epilogue_store(storage_t, activation, has_residual, 'acc%d' % t if n == tw else capture(c.lane, 'acc%d' % t, tw, j0), acc_t, n, i)}\
</%def>

__kernel void conv2d_direct(
    ${parameters})
{
    const int tile = get_global_id(0);
    const int row = get_global_id(1);
    const int kb = get_global_id(2);
    if (tile >= ${w_tiles} || row >= batch * ${h_out} || kb >= ${groups * k_blocks})
        return;
    const int n = row / ${h_out};
    const int oh = row - n * ${h_out};
    const int g = kb / ${k_blocks};
    const int k0 = (kb - g * ${k_blocks}) * ${tk};
    const int ow0 = tile * ${tw};
    const int ih0 = oh * ${SH} - ${PT};
    const int iw0 = ow0 * ${SW} - ${PL};

    __global const ${storage_t} *xg = x + x_off + ((idx_t)n * ${cin} + g * ${cin_g}) * ${height * width};
% for t in range(tk):
% if ragged_k:
    const idx_t wrow${t} = w_off + (idx_t)(g * ${cout_g} + min(k0 + ${t}, ${cout_g - 1})) * ${cin_g * KHW};
% else:
    const idx_t wrow${t} = w_off + (idx_t)(g * ${cout_g} + k0 + ${t}) * ${cin_g * KHW};
% endif
    ${accv} acc${t} = (${accv})0;
% endfor

    if (iw0 >= 0 && iw0 + ${last_col} < ${width}) {
${accumulate(True)}
    } else {
${accumulate(False)}
    }

    const int ohw = oh * ${w_out} + ow0;
% for t in range(tk):
% if ragged_k:
    if (k0 + ${t} < ${cout_g}) {
% else:
    {
% endif
        const idx_t yi = ((idx_t)n * ${cout} + g * ${cout_g} + k0 + ${t}) * ${h_out * w_out} + ohw;
% if has_bias:
        acc${t} += LOAD(b, b_off + g * ${cout_g} + k0 + ${t});
% endif
% if ragged_w:
        if (ow0 + ${tw} <= ${w_out}) {
            ${epilogue(t, tw, 'yi')};
        } else {
% for j in range(tw):
            if (ow0 + ${j} < ${w_out}) ${epilogue(t, 1, 'yi + %d' % j, j)};
% endfor
        }
% else:
        ${epilogue(t, tw, 'yi')};
% endif
    }
% endfor
}
