## Each word gets the marker plus its index: the probe of whether a kernel's writes reach a
## host array's own memory without a map (clconv.arrays.writes_in_place).
__kernel void mark(
    ${parameters})
{
    const uint i = get_global_id(0);
    dst[i] = ${marker}u + i;
}
