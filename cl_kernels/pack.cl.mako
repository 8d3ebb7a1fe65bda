## Pack a 1x1 convolution's input by position tiles for the implicit GEMM (pack=1):
## xp[n][tile][c][j] = the input at output position p = tile * T + j (oh = p / w_out,
## ow = p % w_out: input (oh * sh, ow * sw)), 0 past the last position. A work-item of the
## GEMM then reads its tile's T values of consecutive channels from consecutive memory,
## instead of one short run per channel plane (which the caches fetch line by line, far
## apart).
##
## Global range: (tiles, batch * channels); a work-item writes one tile of one channel.
<%namespace name="c" file="common.cl.mako"/>\
<%
    SH, SW = stride
    positions = h_out * w_out
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

__kernel void pack(${parameters})
{
    const int tile = get_global_id(0);
    const int nc = get_global_id(1);
    if (tile >= ${tiles} || nc >= batch * ${channels})
        return;
    const int n = nc / ${channels};
    const int ch = nc - n * ${channels};
    __global const ${storage_t} *plane = x + x_off + (idx_t)nc * ${height * width};
    __global ${storage_t} *out = xp + xp_off
        + (((idx_t)n * ${tiles} + tile) * ${channels} + ch) * ${T};
% if stride == (1, 1):
    // Position p is plane element p: whole tiles are a unit-stride copy (vectorised).
    const int p0 = tile * ${T};
    if (p0 + ${T} <= ${positions}) {
        for (int j = 0; j < ${T}; ++j)
            STORE(LOAD(plane, p0 + j), out, j);
    } else {
        for (int j = 0; j < ${T}; ++j)
            STORE(p0 + j < ${positions} ? LOAD(plane, min(p0 + j, ${positions - 1})) : (${acc_t})0,
                  out, j);
    }
% else:
    for (int j = 0; j < ${T}; ++j) {
        const int p = tile * ${T} + j;
        const int q = min(p, ${positions - 1});     // read in bounds, store 0 past the end
        const int oh = q / ${w_out};
        const int ow = q - oh * ${w_out};
        const ${acc_t} v = LOAD(plane, oh * ${SH * width} + ow * ${SW});
        STORE(p < ${positions} ? v : (${acc_t})0, out, j);
    }
% endif
}
