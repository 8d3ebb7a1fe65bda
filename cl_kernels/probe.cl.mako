## The capability probe: the vector patterns clconv's kernels use, at one width n and storage
## type, for the device's compiler to build and run (clconv.capabilities checks the output):
## vector loads assembled from scalars (or vload_halfn), arithmetic that becomes FMAs, the
## .even lanes of two vectors (depthwise stride 2, at the widths that take them), comparisons and selects (relu), the exp
## and erf builtins (silu, gelu), lane sums through dot(), and vector stores.
<%namespace name="c" file="common.cl.mako"/>\
${c.header(storage_t, acc_t)}
<% vt = acc_t + (str(n) if n > 1 else '') %>\
__kernel void probe(
    ${parameters})
{
    const int i = get_global_id(0);
    const ${vt} a = ${c.load_vec(storage_t, n, 'x', 'i * %d' % (2 * n))};
    const ${vt} b = ${c.load_vec(storage_t, n, 'x', 'i * %d + %d' % (2 * n, n))};
    ${vt} v = a * b + a;
    v = ${c.activate('relu', 'v', vt)};
% if n in even_pair_widths:
    v += (${vt})(a.even, b.even);
% endif
    v = ${c.activate('silu', 'v', vt)};
    v = ${c.activate('gelu', 'v', vt)};
    ${c.store_vec(storage_t, n, 'v', 'y', 'i * %d' % n)};
    ${c.lane_total('total', 'v', n, acc_t)}
    sums[i] = total;
}
