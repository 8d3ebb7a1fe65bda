## Add up the partial sums of a split reduction in a fixed order (deterministic results):
## out[i] = sum over s of partial[s * count + i], rounded once to the storage type.
<%namespace name="c" file="common.cl.mako"/>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;

__kernel void sum_splits(
    ${parameters})
{
    const idx_t i = get_global_id(0);
    if (i >= ${count})
        return;
    ${acc_t} sum = 0;
    for (int s = 0; s < ${splits}; ++s)
        sum += partial[s * (idx_t)${count} + i];
    STORE(sum, out, out_off + i);
}
