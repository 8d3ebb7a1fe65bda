## Stage the input for the implicit GEMM: copy it onto the grid that GEMM reads densely.
##
## xs[n][c][i][j] = the value torch's padding mode gives at padded input position
## (i * sh - pt, j * sw - pl): for a stride-1 convolution the whole padded plane (sh = sw = 1),
## for a 1x1 convolution with a stride only the positions it reads (the stride is applied
## here, once, instead of in every GEMM step). Values travel through acc_t, which is exact.
##
## Rows from `rows` to `rows_total` are zeros: slack that lets the GEMM's last tiles read
## whole vectors. Global range: (rows_total, batch * channels); a work-item writes one row.
<%namespace name="c" file="common.cl.mako"/>\
<%
    SH, SW = step
    PT, PL = pad_top, pad_left
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

__kernel void stage(__global const ${storage_t} * restrict x, const idx_t x_off,
                    __global ${storage_t} * restrict xs, const idx_t xs_off, const int batch)
{
    const int i = get_global_id(0);
    const int nc = get_global_id(1);
    if (i >= ${rows_total} || nc >= batch * ${channels})
        return;
    __global const ${storage_t} *xp = x + x_off + (idx_t)nc * ${height * width};
    __global ${storage_t} *out = xs + xs_off + ((idx_t)nc * ${rows_total} + i) * ${cols};
    const int ihp = i * ${SH} - ${PT};
    if (i >= ${rows}${' || (uint)ihp >= %du' % height if padding_mode == 'zeros' else ''}) {
        for (int j = 0; j < ${cols}; ++j)
            STORE((${acc_t})0, out, j);
        return;
    }
% if padding_mode == 'zeros':
    __global const ${storage_t} *xr = xp + ihp * ${width};
    for (int j = 0; j < ${cols}; ++j) {
        const int iw = j * ${SW} - ${PL};
        STORE((uint)iw < ${width}u ? LOAD(xr, iw) : (${acc_t})0, out, j);
    }
% else:
    __global const ${storage_t} *xr = xp + ${c.padded_index(padding_mode, 'ihp', height)} * ${width};
    for (int j = 0; j < ${cols}; ++j) {
        const int iwp = j * ${SW} - ${PL};
        STORE(LOAD(xr, ${c.padded_index(padding_mode, 'iwp', width)}), out, j);
    }
% endif
}
