## Fold a gradient over the padded input back onto the input (the adjoint of padding).
##
## Under padding mode reflect, replicate or circular, a padded position reads some input
## position; its gradient belongs there. Each work-item owns one input element and sums the
## padded positions that read it: itself, plus at most two mirrored, wrapped or (for
## replicate at the edges) repeated runs per dimension, so the sum is gathered, not
## scattered. The padded plane is (height + pt + pb) x (width + pl + pr).
##
## Global range: (width, height, batch * channels).
<%namespace name="c" file="common.cl.mako"/>\
<%
    PT, PB, PL, PR = pad
    HP, WP = height + PT + PB, width + PL + PR
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

## Runs (start, count) in padded coordinates of the positions that read input index i of a
## dimension of size n with padding (before, after); a run with count 0 is empty.
<%def name="runs(v, i, n, before, after)">\
    int ${v}_start[3] = {${i} + ${before}, 0, 0};
    int ${v}_count[3] = {1, 0, 0};
% if padding_mode == 'reflect':
    if (${i} >= 1 && ${i} <= ${before}) { ${v}_start[1] = ${before} - ${i}; ${v}_count[1] = 1; }
    if (${i} <= ${n - 2} && ${i} >= ${n - 1 - after}) { ${v}_start[2] = ${before + 2 * (n - 1)} - ${i}; ${v}_count[2] = 1; }
% elif padding_mode == 'replicate':
    if (${i} == 0) { ${v}_start[1] = 0; ${v}_count[1] = ${before}; }
    if (${i} == ${n - 1}) { ${v}_start[2] = ${before + n}; ${v}_count[2] = ${after}; }
% elif padding_mode == 'circular':
    if (${i} >= ${n - before}) { ${v}_start[1] = ${i} + ${before - n}; ${v}_count[1] = 1; }
    if (${i} < ${after}) { ${v}_start[2] = ${i} + ${before + n}; ${v}_count[2] = 1; }
% endif
</%def>

__kernel void fold_padding(
    ${parameters})
{
    const int iw = get_global_id(0);
    const int ih = get_global_id(1);
    const idx_t plane = get_global_id(2);
${runs('r', 'ih', height, PT, PB)}
${runs('s', 'iw', width, PL, PR)}
    __global const ${acc_t} *src = dxp + plane * ${HP * WP};
    ${acc_t} sum = 0;
    for (int a = 0; a < 3; ++a)
        for (int qh = r_start[a]; qh < r_start[a] + r_count[a]; ++qh)
            for (int b = 0; b < 3; ++b)
                for (int qw = s_start[b]; qw < s_start[b] + s_count[b]; ++qw)
                    sum += src[qh * ${WP} + qw];
    STORE(sum, dx, dx_off + (plane * ${height} + ih) * ${width} + iw);
}
