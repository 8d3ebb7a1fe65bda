## The device's practical peak: independent chains of `x * a + b` on explicit float vectors
## (PoCL turns these into FMA instructions; its fma()/mad() builtins were ~10x slower).
<%namespace name="c" file="common.cl.mako"/>\
<% vt = 'float%d' % width if width > 1 else 'float' %>\
__kernel void fma_peak(
    ${parameters})
{
% for i in range(chains):
    ${vt} x${i} = (${vt})(get_global_id(0) + ${i});
% endfor
    for (int it = 0; it < iters; ++it) {
% for i in range(chains):
        x${i} = x${i} * a + b;
% endfor
    }
    const ${vt} s = ${' + '.join('x%d' % i for i in range(chains))};
    ${c.lane_total('total', 's', width, 'float')}
    out[get_global_id(0)] = total;
}
