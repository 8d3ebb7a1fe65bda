## Implicit GEMM: output (channels x pixels) = weights (channels x cin*KH*KW) times the input
## windows, never materialised (no im2col).
##
## The input is read on a grid of `cols` columns where every kernel tap is a constant offset:
## the staged input (padding applied; a stride split into phases, one plane per phase, each
## tap reading one phase as in a stride-1 convolution; zero rows at the end of each plane let
## every tile read densely), or the input itself when there is nothing to stage (then the last
## tile reads the plane's last values, shifted back, or lane by lane on a plane smaller than a
## tile), or, for a 1x1 kernel with pack=1, the input packed by tiles (pack.cl.mako: a tile's
## values of consecutive channels consecutive). Output pixel (oh, ow) sits at grid position
## p = oh * cols + ow, so
## a run of consecutive p is one dense vector load per tap; positions with ow >= w_out (the
## grid's extra columns) are computed and dropped. One work-item computes tk output channels x tv vectors of tw positions: the
## register tile of a CPU GEMM micro-kernel (tw-wide FMAs, one weight broadcast per channel).
##
## Global range: (position tiles, groups * channel blocks, batch), rounded up to the
## work-group size; the surplus work-items return at once (the kernel has no barriers).
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    NPH, NPW = grid.phases
    KHW = KH * KW
    T = tv * tw                                 # grid positions per work-item
    plane, cols, ends, reach = grid.plane, grid.cols, grid.positions, grid.reach
    tiles = grid.tiles
    k_blocks, ragged_k = channel_blocks.count, channel_blocks.ragged
    # A tap's offset: its phase plane, then its place in that plane. Even steps (no phases)
    # are a product in the kernel, else a table (run-time % and / by the stride compile to an
    # instruction Oclgrind cannot check).
    tap_rows, tap_cols = list(grid.tap_rows), list(grid.tap_cols)

    def tap_term(name, table, var):
        step = table[1] if len(table) > 1 else 0
        return '%s * %d' % (var, step) if table == [i * step for i in range(len(table))] \
            else '%s[%s]' % (name, var)
    row_term = tap_term('tap_rows', tap_rows, 'kh')
    col_term = tap_term('tap_cols', tap_cols, 'kw')
    dense_out = cols == w_out                   # grid positions are output positions
    # Where the last tile would read past the plane, it reads the last T + reach values
    # instead (shifted back, still dense) and stores only the positions it owns: the lane
    # by lane reads ran several times slower than vector loads.
    # Packed (pack=1, 1x1 kernels): x holds each tile's T values per channel, zero-filled,
    # so every read is inside and a channel's values follow the previous channel's.
    all_inside = packed or tiles * T - 1 + reach < plane
    shifted = not all_inside and plane >= T + reach
    channel_stride = T if packed else NPH * NPW * plane
    accv = acc_t + (str(tw) if tw > 1 else '')
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;
% for name, table, term in (('tap_rows', tap_rows, row_term), ('tap_cols', tap_cols, col_term)):
% if term.startswith(name):
__constant int ${name}[${len(table)}] = {${', '.join(map(str, table))}};
% endif
% endfor

## The tw grid values of vector v under the tap at offset off, in the fast path (all inside
## the plane) or lane by lane, clamped into the plane (the last tiles: clamped lanes are
## never stored).
<%def name="taps(inside)">
    for (int ci = 0; ci < ${cin_g}; ++ci) {
        __global const ${storage_t} *xc = xg + (idx_t)ci * ${channel_stride};
% for t in range(tk):
        __global const ${storage_t} *w${t} = w + wrow${t} + ci * ${KHW};
% endfor
        #pragma unroll
        for (int kh = 0; kh < ${KH}; ++kh) {
% if unroll_kw:
            #pragma unroll
% endif
            for (int kw = 0; kw < ${KW}; ++kw) {
                const int off = ${'0' if packed else 'p0'} + ${row_term} + ${col_term};
% for v in range(tv):
% if inside:
                const ${accv} x${v} = ${c.load_vec(storage_t, tw, 'xc', 'off + %d' % (v * tw))};
% else:
                const ${accv} x${v} = (${accv})(${', '.join('LOAD(xc, min(off + %d, %d))' % (v * tw + j, plane - 1) for j in range(tw))});
% endif
% endfor
% for t in range(tk):
                const ${acc_t} w${t}k = LOAD(w${t}, kh * ${KW} + kw);
% for v in range(tv):
                acc${t}_${v} += w${t}k * x${v};
% endfor
% endfor
            }
        }
    }
</%def>

__kernel void implicit_gemm(
    ${parameters})
{
    const int tile = get_global_id(0);
    const int kb = get_global_id(1);
    const int n = get_global_id(2);
    if (tile >= ${tiles} || kb >= ${groups * k_blocks} || n >= batch)
        return;
    const int g = kb / ${k_blocks};
    const int k0 = (kb - g * ${k_blocks}) * ${tk};
    const int own = tile * ${T};                // the first grid position it stores
% if shifted:
    const int p0 = min(own, ${plane - T - reach});    // the first it reads
% else:
    const int p0 = own;
% endif
% if packed:
    __global const ${storage_t} *xg = x + x_off + (((idx_t)n * ${tiles} + tile) * ${cin} + g * ${cin_g}) * ${T};
% else:
    __global const ${storage_t} *xg = x + x_off + ((idx_t)n * ${cin} + g * ${cin_g}) * ${NPH * NPW * plane};
% endif
% for t in range(tk):
% if ragged_k:
    const idx_t wrow${t} = w_off + (idx_t)(g * ${cout_g} + min(k0 + ${t}, ${cout_g - 1})) * ${cin_g * KHW};
% else:
    const idx_t wrow${t} = w_off + (idx_t)(g * ${cout_g} + k0 + ${t}) * ${cin_g * KHW};
% endif
% for v in range(tv):
    ${accv} acc${t}_${v} = (${accv})0;
% endfor
% endfor

% if all_inside or shifted:
${taps(True)}
% else:
    if (p0 + ${T - 1 + reach} < ${plane}) {
${taps(True)}
    } else {
${taps(False)}
    }
% endif

% for t in range(tk):
    ${'if (k0 + %d < %d)' % (t, cout_g) if ragged_k else ''} {
        const idx_t yc = ((idx_t)n * ${cout} + g * ${cout_g} + k0 + ${t}) * ${h_out * w_out};
% if has_bias:
        const ${acc_t} bias = LOAD(b, b_off + g * ${cout_g} + k0 + ${t});
% endif
% for v in range(tv):
<% a = 'acc%d_%d' % (t, v) %>\
% if has_bias:
        ${a} += bias;
% endif
% if dense_out:
        if (${'p0 + %d >= own && ' % (v * tw) if shifted else ''}p0 + ${(v + 1) * tw} <= ${ends}) {
            ${c.epilogue_store(storage_t, activation, has_residual, a, acc_t, tw, 'yc + p0 + %d' % (v * tw))};
        } else {
% for j in range(tw):
            if (${'p0 + %d >= own && ' % (v * tw + j) if shifted else ''}p0 + ${v * tw + j} < ${ends}) ${c.epilogue_store(storage_t, activation, has_residual, capture(c.lane, a, tw, j), acc_t, 1, 'yc + p0 + %d' % (v * tw + j))};
% endfor
        }
% else:
## A vector inside one output row is one store; one across the row's end or the grid's extra
## columns goes lane by lane.
        {
            const int p = p0 + ${v * tw};
            const int oh = p / ${cols};
            const int ow = p - oh * ${cols};
% if tw > 1:
            if (${'p >= own && ' if shifted else ''}oh < ${h_out} && ow + ${tw} <= ${w_out}) {
                ${c.epilogue_store(storage_t, activation, has_residual, a, acc_t, tw, 'yc + oh * %d + ow' % w_out)};
            } else {
% endif
% for j in range(tw):
            {
                const int q = p + ${j};
                const int qh = q / ${cols};
                const int qw = q - qh * ${cols};
                if (${'q >= own && ' if shifted else ''}qw < ${w_out} && q < ${ends})
                    ${c.epilogue_store(storage_t, activation, has_residual, capture(c.lane, a, tw, j), acc_t, 1, 'yc + qh * %d + qw' % w_out)};
            }
% endfor
% if tw > 1:
            }
% endif
        }
% endif
% endfor
    }
% endfor
}
