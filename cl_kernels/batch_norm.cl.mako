## Training-mode BatchNorm2d of a convolution's output y (N, channels, plane), with the
## activation after it, as torch computes them: batch statistics, the running statistics
## updated, and the backward of both. A channel's statistics need all of its N x plane
## values, so a work-group of `group_size` work-items (a power of two) computes one channel
## at a time, `per_group` channels in turn: each work-item reads tw consecutive values at a
## time (explicit vectors: PoCL does not vectorise a loop whose trip count differs between
## work-items), the plane's last plane % tw values one a work-item, and the shares are
## added up in local memory. Every work-item reaches every barrier: the global range is
## exactly groups x group_size, and the channel loop's bounds are the group's alike.
##
## batch_norm_forward: mean and biased variance (two passes), invstd = 1 / sqrt(var + eps),
## z = activation(y * (gamma * invstd) + (beta - mean * gamma * invstd)) (torch's CPU form);
## mean and invstd saved for the backward; running_mean and running_var (unbiased variance)
## moved by `momentum` when `running`.
## batch_norm_backward: g = dz through the activation's gradient at its input v (recomputed
## from y, mean and invstd as the forward computed it: nothing of its output is kept), dbeta = sum g,
## dgamma = sum g * xhat and dy = gamma * invstd * (g - dbeta / count - xhat * dgamma / count),
## xhat = (y - mean) * invstd: both sums in one pass, dy in a second.
<%namespace name="c" file="common.cl.mako"/>\
<%
    vec_t = acc_t + (str(tw) if tw > 1 else '')
    whole = plane_vectors.whole
    tail = plane - whole
    gamma = 'LOAD(gamma + gamma_off, k)' if affine else '(%s)1' % acc_t
    beta = 'LOAD(beta + beta_off, k)' if affine else '(%s)0' % acc_t
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

## For every value of channel k: body(t, n), statements on the n values (of type t) at the
## flat index `at`: whole vectors of tw, each work-item in turn, then the tail.
<%def name="each_value(body)">\
    for (int n = 0; n < batch; ++n) {
        const idx_t base = ((idx_t)n * ${channels} + k) * ${plane};
        for (int i = lid * ${tw}; i < ${whole}; i += ${group_size * tw}) {
            const idx_t at = base + i;
            ${body(vec_t, tw)}
        }
% if tail:
        for (int i = ${whole} + lid; i < ${plane}; i += ${group_size}) {
            const idx_t at = base + i;
            ${body(acc_t, 1)}
        }
% endif
    }
</%def>

## Declare acc_t `names`: the channel's sums of `terms` (C expressions over the values that
## declare(t, n) declares), the same in every work-item of the group.
<%def name="channel_sums(names, declare, terms)">\
% for name in names:
    ${acc_t} ${name};
% endfor
    {
% for name in names:
        ${vec_t} ${name}_vec = (${vec_t})0;
        ${acc_t} ${name}_one = 0;
% endfor
<%def name="add(t, n)">\
${declare(t, n)}
% for name, term in zip(names, terms):
            ${name}_${'one' if n == 1 else 'vec'} += ${term};
% endfor
</%def>\
${each_value(add)}
% for j, name in enumerate(names):
        ${c.lane_total(name + '_lanes', name + '_vec', tw, acc_t, ' + %s_one' % name)}
        sums[${j * group_size} + lid] = ${name}_lanes;
% endfor
        barrier(CLK_LOCAL_MEM_FENCE);
% for half in halves:
        if (lid < ${half}) {
% for j in range(len(names)):
            sums[${j * group_size} + lid] += sums[${j * group_size} + lid + ${half}];
% endfor
        }
        barrier(CLK_LOCAL_MEM_FENCE);
% endfor
% for j, name in enumerate(names):
        ${name} = sums[${j * group_size}];
% endfor
        barrier(CLK_LOCAL_MEM_FENCE);
    }
</%def>

## The gradient through the activation at its input v (a C expression of type t) of the
## gradient g at its output, as torch's backward of each computes it (threshold_backward,
## hardtanh_backward, silu_backward, gelu_backward): NaN passes relu and relu6.
<%def name="activation_grad(activation, v, g, t)">\
% if activation is None:
${g}\
% elif activation == 'relu':
(${v} <= (${t})0 ? (${t})0 : ${g})\
% elif activation == 'relu6':
(${v} <= (${t})0 || ${v} >= (${t})6 ? (${t})0 : ${g})\
% elif activation == 'silu':
(${g} * ((${t})1 / ((${t})1 + exp(-${v}))) * ((${t})1 + ${v} * ((${t})1 - (${t})1 / ((${t})1 + exp(-${v})))))\
% else:
<% f = '' if acc_t == 'double' else '_F' %>\
(${g} * ((${t})0.5 * ((${t})1 + erf(${v} * M_SQRT1_2${f})) + ${v} * exp((${t})-0.5 * ${v} * ${v}) * (M_2_SQRTPI${f} * M_SQRT1_2${f} * (${t})0.5)))\
% endif
</%def>

## The values y (and dz) at `at`, as t.
<%def name="load_y(t, n)">\
            const ${t} yv = ${c.load_vec(storage_t, n, 'y + y_off', 'at')};
</%def>
<%def name="load_y_dz(t, n)">\
${load_y(t, n)}\
            const ${t} dzv = ${c.load_vec(storage_t, n, 'dz + dz_off', 'at')};
            const ${t} gv = ${activation_grad(activation, '(yv * scale + shift)', 'dzv', t)};
</%def>

% if operation == 'forward':
<%def name="store_z(t, n)">\
${load_y(t, n)}\
            const ${t} v = yv * scale + shift;
            const ${t} zv = ${c.activate(activation, 'v', t)};
            ${c.store_vec(storage_t, n, 'zv', 'z + z_off', 'at')};
</%def>\
__kernel __attribute__((reqd_work_group_size(${group_size}, 1, 1)))
void batch_norm_forward(
    ${parameters})
{
    __local ${acc_t} sums[${group_size}];
    const int lid = get_local_id(0);
    const ${acc_t} count = (${acc_t})batch * ${plane};
    const int first = get_group_id(0) * ${per_group};
    for (int k = first; k < min(first + ${per_group}, ${channels}); ++k) {
${channel_sums(['total'], load_y, ['yv'])}
    const ${acc_t} mean = total / count;
${channel_sums(['squares'], load_y, ['(yv - mean) * (yv - mean)'])}
    const ${acc_t} invstd = (${acc_t})1 / sqrt(squares / count + (${acc_t})eps);
    const ${acc_t} scale = ${gamma} * invstd;
    const ${acc_t} shift = ${beta} - mean * scale;
${each_value(store_z)}
    if (lid == 0) {
        mean_out[k] = mean;
        invstd_out[k] = invstd;
% if running:
        const ${acc_t} m = (${acc_t})momentum;
        STORE(m * mean + ((${acc_t})1 - m) * LOAD(running_mean + running_mean_off, k),
              running_mean + running_mean_off, k);
        STORE(m * (squares / (count - (${acc_t})1))
              + ((${acc_t})1 - m) * LOAD(running_var + running_var_off, k),
              running_var + running_var_off, k);
% endif
    }
    }
}
% else:
<%def name="store_dy(t, n)">\
${load_y_dz(t, n)}\
            const ${t} dyv = (gv - mean_g - (yv - mean) * slope) * scale;
            ${c.store_vec(storage_t, n, 'dyv', 'dy + dy_off', 'at')};
</%def>\
__kernel __attribute__((reqd_work_group_size(${group_size}, 1, 1)))
void batch_norm_backward(
    ${parameters})
{
    __local ${acc_t} sums[${2 * group_size}];
    const int lid = get_local_id(0);
    const ${acc_t} count = (${acc_t})batch * ${plane};
    const int first = get_group_id(0) * ${per_group};
    for (int k = first; k < min(first + ${per_group}, ${channels}); ++k) {
    const ${acc_t} mean = mean_in[k];
    const ${acc_t} invstd = invstd_in[k];
    // v as the forward computed it, so that the activation's gradient sees the same value.
    const ${acc_t} scale = ${gamma} * invstd;
    const ${acc_t} shift = ${beta} - mean * scale;
${channel_sums(['sum_g', 'sum_gx'], load_y_dz, ['gv', 'gv * (yv - mean)'])}
    if (lid == 0) {
        dbeta[k] = sum_g;
        dgamma[k] = sum_gx * invstd;
    }
    const ${acc_t} mean_g = sum_g / count;
    const ${acc_t} slope = sum_gx * invstd * invstd / count;
${each_value(store_dy)}
    }
}
% endif
