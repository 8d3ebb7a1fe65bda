## Stage the input for the implicit GEMM: copy it onto the grid that GEMM reads densely.
##
## Along each dimension the padded input splits into `phases` (the stride's, or just phase 0
## when every tap reads it): xs[n][c][a][b][i][j] = the value torch's padding mode gives at
## padded input position (i * sh + a, j * sw + b), input position (i * sh + a - pt,
## j * sw + b - pl). At stride 1 that is the padded plane itself; for a 1x1 convolution with a
## stride only the positions it reads. Values travel through acc_t, which is exact.
##
## Rows from `rows` to `rows_total` of each phase are zeros: slack that lets the GEMM's last
## tiles read whole vectors. Global range: (row phases * rows_total, batch * channels); a
## work-item writes one row of every column phase.
<%namespace name="c" file="common.cl.mako"/>\
<%
    SH, SW = stride
    NPH, NPW = grid.phases
    PT, PL = pad_top, pad_left
    rows, rows_total, cols = grid.used_rows, grid.rows, grid.cols

    def inside(b):
        """The columns j of column phase b whose input column j * SW + b - PL is inside the
        input: [first, end)."""
        first = max(0, -(-(PL - b) // SW))
        end = min(cols, max(first, (width - 1 + PL - b) // SW + 1))
        return first, end
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

__kernel void stage(${parameters})
{
    const int r = get_global_id(0);
    const int nc = get_global_id(1);
    if (r >= ${NPH * rows_total} || nc >= batch * ${channels})
        return;
    const int a = r / ${rows_total};
    const int i = r - a * ${rows_total};
    __global const ${storage_t} *xp = x + x_off + (idx_t)nc * ${height * width};
    const int ihp = i * ${SH} + a - ${PT};
    const bool zero_row = i >= ${rows}${' || (uint)ihp >= %du' % height if padding_mode == 'zeros' else ''};
% if padding_mode == 'zeros':
    __global const ${storage_t} *xr = xp + ihp * ${width};
% else:
    __global const ${storage_t} *xr = xp + ${c.padded_index(padding_mode, 'ihp', height)} * ${width};
% endif
## Column phases unrolled: each one's inside columns are a plain copy (a unit-stride loop at
## stride 1, which the compiler vectorises); only the few border columns map through the
## padding mode.
% for b in range(NPW):
<% first, end = inside(b) %>\
    {
        __global ${storage_t} *out = xs + xs_off
            + (((idx_t)nc * ${NPH} + a) * ${NPW} + ${b}) * ${rows_total * cols} + i * ${cols};
        if (zero_row) {
            for (int j = 0; j < ${cols}; ++j)
                STORE((${acc_t})0, out, j);
        } else {
% for lo, hi in ((0, first), (end, cols)):
% if hi > lo:
            for (int j = ${lo}; j < ${hi}; ++j) {
% if padding_mode == 'zeros':
                STORE((${acc_t})0, out, j);
% else:
                const int iwp = j * ${SW} + ${b - PL};
                STORE(LOAD(xr, ${c.padded_index(padding_mode, 'iwp', width)}), out, j);
% endif
            }
% endif
% endfor
            for (int j = ${first}; j < ${end}; ++j)
                STORE(LOAD(xr, j * ${SW} + ${b - PL}), out, j);
        }
    }
% endfor
}
