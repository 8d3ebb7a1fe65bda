## Depthwise convolution (one input channel per group, any channel multiplier): memory-bound,
## so each work-item streams whole output rows of one channel, `rows` rows, in tw-wide vectors,
## and the per-work-item set-up (channel, weights, bias) is paid once per row block.
##
## Along a row, which vectors lie wholly inside the input is known here: those read plain
## vector loads (for stride 2, two loads and their even lanes), the few at the borders read
## lane by lane through the padding mode. Rows outside the input are skipped ('zeros') or
## mapped by the padding mode.
##
## Global range: (row blocks, batch * out_channels), rounded up to the work-group size; the
## surplus work-items return at once (the kernel has no barriers).
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    SH, SW = stride
    DH, DW = dilation
    PT, PB, PL, PR = pad
    KHW = KH * KW
    M = cout_g                                  # output channels per input channel
    tiles = column_tiles.count
    accv = acc_t + (str(tw) if tw > 1 else '')
    even_loads = SW == 2 and tw in even_pair_widths     # two vector loads, their even lanes
    # Input elements a vector load reads from a tile's first input column, over all taps.
    span = (KW - 1) * DW + (2 * tw if even_loads else (tw - 1) * SW + 1)
    inside = [t for t in range(tiles) if t * tw * SW - PL >= 0
              and t * tw * SW - PL + span <= width and (t + 1) * tw <= w_out]
    first_in, end_in = (inside[0], inside[-1] + 1) if inside else (0, 0)
    assert inside == list(range(first_in, end_in))
    # The border tiles, each with its taps unrolled here so that every lane's column is a
    # constant (runtime-selected lanes cost ~20x an inside tile, and doubled a 112-wide
    # row's time), unless that would be too much code.
    border = [t for t in range(tiles) if t not in inside]
    static_border = len(border) * KW <= 64

    def source_column(t, kw, j):
        """The input column lane j of tile t reads under tap column kw, or None for a zero
        (padding, or a lane past the row's end that is never stored)."""
        col = t * tw * SW - PL + kw * DW + j * SW
        if t * tw + j >= w_out or (padding_mode == 'zeros' and not 0 <= col < width):
            return None
        if padding_mode == 'reflect':
            col = -col if col < 0 else 2 * width - 2 - col if col >= width else col
        elif padding_mode == 'circular':
            col = col + width if col < 0 else col - width if col >= width else col
        return min(max(col, 0), width - 1)
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

## The input vector under tap column kw of the tile whose first input column is iw0.
<%def name="inside_load()">\
% if even_loads:
(${accv})((${c.load_vec(storage_t, tw, 'xr', 'iw0 + kw * %d' % DW)}).even, (${c.load_vec(storage_t, tw, 'xr', 'iw0 + kw * %d + %d' % (DW, tw))}).even)\
% elif SW == 1:
${c.load_vec(storage_t, tw, 'xr', 'iw0 + kw * %d' % DW)}\
% else:
(${accv})(${', '.join('LOAD(xr, iw0 + kw * %d + %d)' % (DW, j * SW) for j in range(tw))})\
% endif
</%def>

## Tile t's input vector under tap column kw, every lane's column a constant.
<%def name="static_load(t, kw)">\
(${accv})(${', '.join('(%s)0' % acc_t if col is None else 'LOAD(xr, %d)' % col for col in (source_column(t, kw, j) for j in range(tw)))})\
</%def>

## One tile's tw outputs of row oh: the taps, then the bias and the epilogue. inside: all its
## loads are in the row; else at_t: the tile's index when its columns are constants here.
<%def name="tile(inside, at_t=None)">
% if at_t is not None:
            const int t = ${at_t};
% endif
            const int ow0 = t * ${tw};
            const int iw0 = ow0 * ${SW} - ${PL};
            ${accv} acc = (${accv})bias;
            #pragma unroll
            for (int kh = 0; kh < ${KH}; ++kh) {
% if padding_mode == 'zeros':
                const int ih = ih0 + kh * ${DH};
                if ((uint)ih >= ${height}u) continue;
% else:
                const int ihp = ih0 + kh * ${DH};
                const int ih = ${c.padded_index(padding_mode, 'ihp', height)};
% endif
                __global const ${storage_t} *xr = xc + ih * ${width};
% if at_t is not None:
% for kw in range(KW):
                acc += LOAD(wc, kh * ${KW} + ${kw}) * ${static_load(at_t, kw)};
% endfor
% else:
                #pragma unroll
                for (int kw = 0; kw < ${KW}; ++kw) {
% if inside:
                    const ${accv} xv = ${inside_load()};
% else:
                    const int iwk = iw0 + kw * ${DW};
                    const ${accv} xv = (${accv})(${', '.join(capture(c.padded_load, padding_mode, acc_t, 'xr', 'iwk + %d' % (j * SW), width) for j in range(tw))});
% endif
                    acc += LOAD(wc, kh * ${KW} + kw) * xv;
                }
% endif
            }
% if inside or w_out % tw == 0:
            ${c.epilogue_store(storage_t, activation, has_residual, 'acc', acc_t, tw, 'yr + ow0')};
% else:
            if (ow0 + ${tw} <= ${w_out}) {
                ${c.epilogue_store(storage_t, activation, has_residual, 'acc', acc_t, tw, 'yr + ow0')};
            } else {
% for j in range(tw):
                if (ow0 + ${j} < ${w_out}) ${c.epilogue_store(storage_t, activation, has_residual, capture(c.lane, 'acc', tw, j), acc_t, 1, 'yr + ow0 + %d' % j)};
% endfor
            }
% endif
</%def>

__kernel void depthwise(
    ${parameters})
{
    const int rb = get_global_id(0);
    const int nk = get_global_id(1);
    if (rb >= ${row_blocks.count} || nk >= batch * ${cout})
        return;
    const int n = nk / ${cout};
    const int k = nk - n * ${cout};
    __global const ${storage_t} *xc = x + x_off + ((idx_t)n * ${cin} + k / ${M}) * ${height * width};
    __global const ${storage_t} *wc = w + w_off + k * ${KHW};
    const ${acc_t} bias = ${'LOAD(b, b_off + k)' if has_bias else '0'};
    for (int oh = rb * ${rows}; oh < min(rb * ${rows} + ${rows}, ${h_out}); ++oh) {
        const int ih0 = oh * ${SH} - ${PT};
        const idx_t yr = (idx_t)nk * ${h_out * w_out} + oh * ${w_out};
% for lo, hi, is_inside in ((0, first_in, False), (first_in, end_in, True), (end_in, tiles, False)):
% if hi > lo and (is_inside or not static_border):
        for (int t = ${lo}; t < ${hi}; ++t) {
${tile(is_inside)}
        }
% elif hi > lo:
% for t in range(lo, hi):
        {
${tile(False, t)}
        }
% endfor
% endif
% endfor
    }
}
