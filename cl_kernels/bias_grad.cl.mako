## The gradient of a convolution with respect to its bias: db[k] = sum over n, h, w of
## dy[n, k, h, w]. Each work-item sums one channel's planes for a share of the batch, a vector
## of tw at a time; with splits > 1 the shares are partial sums for sum_splits.
##
## Global range: (channels, splits).
<%namespace name="c" file="common.cl.mako"/>\
<%
    full = plane_vectors.whole
    accv = acc_t + (str(tw) if tw > 1 else '')
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

__kernel void conv2d_bias_grad(
    ${parameters})
{
    const int k = get_global_id(0);
    const int split = get_global_id(1);
    if (k >= ${channels} || split >= ${splits})
        return;
    const int per_split = (batch + ${splits - 1}) / ${splits};
    const int n_end = min(batch, (split + 1) * per_split);
    ${accv} acc = (${accv})0;
    ${acc_t} tail = 0;
    for (int n = split * per_split; n < n_end; ++n) {
        __global const ${storage_t} *p = dy + dy_off + ((idx_t)n * ${channels} + k) * ${plane};
        for (int i = 0; i < ${full}; i += ${tw})
            acc += ${c.load_vec(storage_t, tw, 'p', 'i')};
## The last (plane - full < tw) values, unrolled: PoCL 3.1's LLVM 15 miscompiles a tail
## loop after a one-vector loop in half (a crash at run time).
% for i in range(full, plane):
        tail += LOAD(p, ${i});
% endfor
    }
    ${c.lane_total('sum', 'acc', tw, acc_t, ' + tail')}
    ${c.store_vec(out_t, 1, 'sum', 'db', '(idx_t)split * %d + k' % channels)};
}
