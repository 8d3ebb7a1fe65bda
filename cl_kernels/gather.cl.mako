## Copy a strided 4-D view into a contiguous array, bit for bit (the element type is an
## unsigned integer of the element's size, so any dtype travels unchanged).
## Shape and strides (in elements) are constants of the view. The NDRange covers the last
## three dimensions and each work-item walks the first, so no index needs a division.
__kernel void gather4d(
    ${parameters})
{
    const long i3 = get_global_id(0), i2 = get_global_id(1), i1 = get_global_id(2);
    const long from = src_off + i1 * ${strides[1]}L + i2 * ${strides[2]}L + i3 * ${strides[3]}L;
    const long to = (i1 * ${shape[2]} + i2) * ${shape[3]} + i3;
    for (long i0 = 0; i0 < ${shape[0]}; ++i0)
        dst[to + i0 * ${shape[1] * shape[2] * shape[3]}L] = src[from + i0 * ${strides[0]}L];
}
