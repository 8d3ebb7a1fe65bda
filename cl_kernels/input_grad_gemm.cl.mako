## The input gradient as implicit GEMMs, one kernel per stride phase (input_grad_gemm.py
## derives the phases and their taps).
##
## Each phase's tiles are a range of dimension 0 of one kernel (so one launch computes them
## all). A work-item of phase i holds tc input channels x tv vectors of tw of the phase's
## positions, summed over the group's output channels and the phase's taps; each tap is one
## dense read of the staged dy grid at a constant offset and one broadcast weight (the offsets
## do the flip). The weight is w as it is, or with wt=1 each group's channels swapped
## (transpose_weight.cl.mako): a work-item's weights then follow each other in memory instead
## of lying a whole output channel's weights apart. Grid position p = u * cols + v is target
## position (a + SH*u, b + SW*v); positions with v >= the phase's columns are computed and
## dropped. Unstaged (a 1x1 kernel without padding), the grid is dy itself and the last tiles
## read lane by lane, clamped into the plane.
##
## Global range: (every phase's position tiles, groups * channel blocks, batch), rounded up
## to the work-group size; the surplus work-items return at once (no barriers).
<%namespace name="c" file="common.cl.mako"/>\
<%
    SH, SW = stride
    KHW = kernel_size[0] * kernel_size[1]
    plane, gcols = layout.grid.plane, layout.grid.cols
    T = tv * tw
    c_blocks, ragged_c = channel_blocks.count, channel_blocks.ragged
    accv = acc_t + (str(tw) if tw > 1 else '')
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

## The phase's taps over every output channel of the group, reading whole vectors (inside)
## or lane by lane. Its kernel rows and columns, and their grid offsets, step evenly: loops.
<%def name="taps(phase, inside)">
<%
    def term(first, step, var):
        return '%d + %s * %d' % (first, var, step) if step else str(first)
    kh0, kh_step, row0_off, row_step = phase.row_steps
    kw0, kw_step, col0_off, col_step = phase.col_steps
    off = '(%s) + (%s)' % (term(row0_off, row_step, 'i'), term(col0_off, col_step, 'j'))
    wi = '(%s) * %d + (%s)' % (term(kh0, kh_step, 'i'), kernel_size[1], term(kw0, kw_step, 'j'))
%>    for (int k = 0; k < ${cout_g}; ++k) {
        #pragma unroll
        for (int i = 0; i < ${len(phase.row_taps)}; ++i) {
% if unroll_kw:
            #pragma unroll
% endif
            for (int j = 0; j < ${len(phase.col_taps)}; ++j) {
                const int off = p0 + ${off};
% for v in range(tv):
% if inside:
                const ${accv} x${v} = ${c.load_vec(storage_t, tw, 'dk', 'off + %d' % (v * tw))};
% else:
                const ${accv} x${v} = (${accv})(${', '.join('LOAD(dk, min(off + %d, %d))' % (v * tw + j, plane - 1) for j in range(tw))});
% endif
% endfor
% for t in range(tc):
                const ${acc_t} w${t}k = LOAD(w${t}, ${wi});
% for v in range(tv):
                acc${t}_${v} += w${t}k * x${v};
% endfor
% endfor
            }
        }
        dk += ${plane};
% for t in range(tc):
        w${t} += ${KHW if transposed_weight else cin_g * KHW};
% endfor
    }
</%def>

## One phase's sums and stores, for the work-item at position p0 of the phase.
<%def name="phase_body(phase)">
% for t in range(tc):
% for v in range(tv):
    ${accv} acc${t}_${v} = (${accv})0;
% endfor
% endfor
% if phase.taps:
    __global const ${storage_t} *dk = dy + dy_off + ((idx_t)n * ${cout} + g * ${cout_g}) * ${plane};
% for t in range(tc):
<% channel = 'min(c0 + %d, %d)' % (t, cin_g - 1) if ragged_c else 'c0 + %d' % t %>\
% if transposed_weight:
    __global const ${storage_t} *w${t} = w + w_off + ((idx_t)g * ${cin_g} + ${channel}) * ${cout_g * KHW};
% else:
    __global const ${storage_t} *w${t} = w + w_off + (idx_t)(g * ${cout_g * cin_g} + ${channel}) * ${KHW};
% endif
% endfor
% if phase.tiles * T - 1 + phase.reach < plane:
${taps(phase, True)}
% else:
    if (p0 + ${T - 1 + phase.reach} < ${plane}) {
${taps(phase, True)}
    } else {
${taps(phase, False)}
    }
% endif
% endif

% for t in range(tc):
    ${'if (c0 + %d < %d)' % (t, cin_g) if ragged_c else ''} {
        const idx_t dc = dx_off + ((idx_t)n * ${cin} + g * ${cin_g} + c0 + ${t}) * ${rows * cols} + ${phase.a * cols + phase.b};
% for v in range(tv):
<% a = 'acc%d_%d' % (t, v) %>\
        {
            const int p = p0 + ${v * tw};
% if tw > 1:
            const int u = p / ${gcols};
            const int v0 = p - u * ${gcols};
            if (u < ${phase.rows} && v0 + ${tw} <= ${phase.cols}) {
% if SW == 1:
                ${c.store_vec(out_t, tw, a, 'dx', 'dc + u * %d + v0' % (SH * cols))};
% else:
                const idx_t d0 = dc + u * ${SH * cols} + v0 * ${SW};
% for j in range(tw):
                ${c.store_vec(out_t, 1, capture(c.lane, a, tw, j), 'dx', 'd0 + %d' % (j * SW))};
% endfor
% endif
            } else {
% endif
## A vector across the phase's row end (or past its last position) goes lane by lane.
% for j in range(tw):
            {
                const int q = p + ${j};
                const int qu = q / ${gcols};
                const int qv = q - qu * ${gcols};
                if (qv < ${phase.cols} && qu < ${phase.rows})
                    ${c.store_vec(out_t, 1, capture(c.lane, a, tw, j), 'dx', 'dc + qu * %d + qv * %d' % (SH * cols, SW))};
            }
% endfor
% if tw > 1:
            }
% endif
        }
% endfor
    }
% endfor
</%def>

__kernel void input_grad_gemm(
    ${parameters})
{
    const int tile = get_global_id(0);
    const int cb = get_global_id(1);
    const int n = get_global_id(2);
    if (tile >= ${layout.tiles} || cb >= ${groups * c_blocks} || n >= batch)
        return;
    const int g = cb / ${c_blocks};
    const int c0 = (cb - g * ${c_blocks}) * ${tc};
## The phases' tiles lie one after another along dimension 0: one launch for all.
% for phase in layout.phases:
% if loop.first:
    if (tile < ${phase.first_tile + phase.tiles}) {
% elif loop.last:
    } else {
% else:
    } else if (tile < ${phase.first_tile + phase.tiles}) {
% endif
        const int p0 = (tile - ${phase.first_tile}) * ${T};
${phase_body(phase)}
% endfor
    }
}
