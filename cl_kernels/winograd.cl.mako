## Winograd F(2x2, 3x3) for 3x3 stride-1 undilated convolutions, in four kernels:
##   winograd_weights  U[xi][k][c]  = (G g G^T)[xi] of each 3x3 filter g (xi: one of 16);
##   winograd_input    V[xi][ci][p] = (B^T d B)[xi] of each 4x4 input tile d (padding applied);
##   winograd_gemm     M[xi][k][p]  = sum over the group's c of U[xi][k][c] V[xi][c][p]:
##                     16 GEMMs, with the implicit GEMM's register tile (tk channels x tv
##                     vectors of tw tiles);
##   winograd_output   y = (A^T M A) of each tile, 2x2 outputs, with bias and the epilogue.
## Tiles p run over the whole batch (n, tile row, tile column), so a small image still fills
## the GEMM's vectors. Each V and M row holds P = batch * tiles values, padded with zeros to
## `ppad`, a multiple of the GEMM's tile. V and M are in acc_t: the transforms round once.
## The 16 planes of U, V and M lie `plane_align * k + plane_skew` elements apart (the
## layout's), so that a work-item's 16 streams fall in different cache sets (planes a power
## of two apart thrashed one set: the weight transform of a 512x512 layer took 5 ms).
##
## The layout is winograd.py's `layout` (WinogradLayout): this template only reads it. U's
## plane stride is rendered; the batch's ppad and the V and M plane strides (vplane, mplane)
## are kernel arguments, computed from the same layout at launch. Each build renders one
## kernel, `entry`, whose parameter list is the `parameters` winograd.py declares for it.
##
## 2.25x fewer multiplies than the direct form, but different rounding, and an inf or NaN
## spreads through the tile's transform to all four outputs of the tile: opt-in only.
<%namespace name="c" file="common.cl.mako"/>\
<%
    PT, PB, PL, PR = pad
    TH, TW = layout.tile_rows, layout.tile_cols     # output tiles per image
    TILES = layout.tiles
    T = layout.tile                                 # the GEMM's positions per work-item
    UPLANE = layout.uplane
    k_blocks, ragged_k = channel_blocks.count, channel_blocks.ragged
    accv = acc_t + (str(tw) if tw > 1 else '')
    half = '(%s)0.5' % acc_t

    def combine(terms):
        """The sum of (coefficient, expression) terms as C, coefficients 1, -1 or 0.5."""
        out = ''
        for coef, e in terms:
            if coef == 0:
                continue
            sign = '-' if coef < 0 else '+'
            out += (' %s ' % sign if out else ('-' if sign == '-' else '')) + e
        return '(%s)' % out
    # 1-D transforms as coefficient rows: B^T (4 from 4), G (4 from 3), A^T (2 from 4).
    BT = [(1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)]
    G = [(1, 0, 0), (1, 1, 1), (1, -1, 1), (0, 0, 1)]     # rows 1 and 2 are halved
    AT = [(1, 1, 1, 0), (0, 1, -1, -1)]

    def transform2d(rows, name, src, dst, scale_rows=()):
        """C lines: dst[i][j] = sum rows[i][a] rows[j][b] src[a][b] (rows in scale_rows
        halved), through named temporaries."""
        n_in = len(rows[0])
        lines = []
        for i, row in enumerate(rows):
            for b in range(n_in):
                e = combine([(coef, '%s%d%d' % (src, a, b)) for a, coef in enumerate(row)])
                if i in scale_rows:
                    e = '%s * %s' % (half, e)
                lines.append('const %s %s_%d%d = %s;' % (acc_t, name, i, b, e))
        for i in range(len(rows)):
            for j, row in enumerate(rows):
                e = combine([(coef, '%s_%d%d' % (name, i, b)) for b, coef in enumerate(row)])
                if j in scale_rows:
                    e = '%s * %s' % (half, e)
                lines.append('const %s %s%d%d = %s;' % (acc_t, dst, i, j, e))
        return '\n'.join('        ' + l for l in lines)
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

% if entry == 'winograd_weights':
__kernel void winograd_weights(
    ${parameters})
{
    const int kc = get_global_id(0);       // k * cin_g + c
    if (kc >= ${layout.filters})
        return;
    __global const ${storage_t} *f = w + w_off + (idx_t)kc * 9;
% for a in range(3):
% for b in range(3):
    const ${acc_t} g${a}${b} = LOAD(f, ${3 * a + b});
% endfor
% endfor
${transform2d(G, 'gt', 'g', 'ug', scale_rows=(1, 2))}
% for i in range(4):
% for j in range(4):
    u[u_off + (idx_t)${UPLANE} * ${4 * i + j} + kc] = ug${i}${j};
% endfor
% endfor
}
% endif

## One work-item: one tile row of one (image, channel), tile by tile. The tiles wholly inside
## the input columns load plainly; the border ones map columns through the padding mode.
<%def name="input_tile(inside)">
% for r in range(4):
% for s in range(4):
<%
    value = 'LOAD(row%d, iw0 + %d)' % (r, s) if inside else \
        capture(c.padded_load, padding_mode, acc_t, 'row%d' % r, 'iw0 + %d' % s, width)
    if padding_mode == 'zeros':
        value = '(inr%d ? %s : (%s)0)' % (r, value, acc_t)
%>\
        const ${acc_t} d${r}${s} = ${value};
% endfor
% endfor
${transform2d(BT, 'dt', 'd', 'v')}
% for i in range(4):
% for j in range(4):
        v[vo + vplane * ${4 * i + j} + p] = v${i}${j};
% endfor
% endfor
</%def>

% if entry == 'winograd_input':
__kernel void winograd_input(
    ${parameters})
{
    const int th = get_global_id(0);
    const int nc = get_global_id(1);
    if (th >= ${TH} || nc >= batch * ${cin})
        return;
    const int n = nc / ${cin};
    const int ci = nc - n * ${cin};
    __global const ${storage_t} *xc = x + x_off + (idx_t)nc * ${height * width};
% for r in range(4):
    const int ihp${r} = th * 2 + ${r - PT};
% if padding_mode == 'zeros':
    const bool inr${r} = (uint)ihp${r} < ${height}u;
    __global const ${storage_t} *row${r} = xc + clamp(ihp${r}, 0, ${height - 1}) * ${width};
% else:
    __global const ${storage_t} *row${r} = xc + ${c.padded_index(padding_mode, 'ihp%d' % r, height)} * ${width};
% endif
% endfor
    const idx_t vo = v_off + ci * ppad;     // this channel's row of each plane
<%
    first = min(TW, -(-PL // 2))                              # first tile inside the columns
    end = max(first, min(TW, (width - 4 + PL) // 2 + 1))      # past the last one
%>\
% for lo, hi, inside in ((0, first, False), (first, end, True), (end, TW, False)):
% if hi > lo:
    for (int tj = ${lo}; tj < ${hi}; ++tj) {
        const idx_t p = (idx_t)(n * ${TH} + th) * ${TW} + tj;
        const int iw0 = tj * 2 - ${PL};
${input_tile(inside)}
    }
% endif
% endfor
    // The padding tiles after the batch's last one are zeros (the GEMM reads them).
    if (n == batch - 1 && th == ${TH - 1}) {
        for (idx_t p = (idx_t)batch * ${TILES}; p < ppad; ++p) {
% for xi in range(16):
            v[vo + vplane * ${xi} + p] = (${acc_t})0;
% endfor
        }
    }
}
% endif

% if entry == 'winograd_gemm':
__kernel void winograd_gemm(
    ${parameters})
{
    const int tile = get_global_id(0);
    const int kb = get_global_id(1);
    const int xi = get_global_id(2);
    if (tile >= ppad / ${T} || kb >= ${groups * k_blocks} || xi >= 16)
        return;
    const int g = kb / ${k_blocks};
    const int k0 = (kb - g * ${k_blocks}) * ${tk};
    const idx_t p0 = (idx_t)tile * ${T};
    __global const ${acc_t} *vg = v + v_off + vplane * xi + (idx_t)(g * ${cin_g}) * ppad + p0;
% for t in range(tk):
    __global const ${acc_t} *u${t} = u + u_off + (idx_t)${UPLANE} * xi + (g * ${cout_g} + ${'min(k0 + %d, %d)' % (t, cout_g - 1) if ragged_k else 'k0 + %d' % t}) * ${cin_g};
% for j in range(tv):
    ${accv} acc${t}_${j} = (${accv})0;
% endfor
% endfor
    for (int ci = 0; ci < ${cin_g}; ++ci) {
        __global const ${acc_t} *vc = vg + ci * ppad;
% for j in range(tv):
        const ${accv} x${j} = ${c.load_vec(acc_t, tw, 'vc', str(j * tw))};
% endfor
% for t in range(tk):
        const ${acc_t} u${t}c = u${t}[ci];
% for j in range(tv):
        acc${t}_${j} += u${t}c * x${j};
% endfor
% endfor
    }
% for t in range(tk):
    ${'if (k0 + %d < %d)' % (t, cout_g) if ragged_k else ''} {
        __global ${acc_t} *mk = m + m_off + mplane * xi + (idx_t)(g * ${cout_g} + k0 + ${t}) * ppad + p0;
% for j in range(tv):
        ${c.store_vec(acc_t, tw, 'acc%d_%d' % (t, j), 'mk', str(j * tw))};
% endfor
    }
% endfor
}
% endif

% if entry == 'winograd_output':
__kernel void winograd_output(
    ${parameters})
{
    const int th = get_global_id(0);
    const int nk = get_global_id(1);
    if (th >= ${TH} || nk >= batch * ${cout})
        return;
    const int n = nk / ${cout};
    const int k = nk - n * ${cout};
    __global const ${acc_t} *mk = m + m_off + (idx_t)k * ppad + (idx_t)(n * ${TH} + th) * ${TW};
% if has_bias:
    const ${acc_t} bias = LOAD(b, b_off + k);
% endif
    const idx_t yk = (idx_t)nk * ${h_out * w_out};
    for (int tj = 0; tj < ${TW}; ++tj) {
% for xi in range(16):
        const ${acc_t} m${xi // 4}${xi % 4} = mk[mplane * ${xi} + tj];
% endfor
${transform2d(AT, 'mt', 'm', 'o')}
% for i in range(2):
% for j in range(2):
<%
    guard = []
    if i and h_out % 2:
        guard.append('th < %d' % (TH - 1))
    if j and w_out % 2:
        guard.append('tj < %d' % (TW - 1))
    value = 'o%d%d + bias' % (i, j) if has_bias else 'o%d%d' % (i, j)
    index = 'yk + (th * 2 + %d) * %d + tj * 2 + %d' % (i, w_out, j)
%>\
        ${'if (%s)' % ' && '.join(guard) if guard else ''} ${c.epilogue_store(storage_t, activation, has_residual, value, acc_t, 1, index)};
% endfor
% endfor
    }
}
% endif
