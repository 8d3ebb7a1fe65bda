## Spread a strided 1x1 convolution's input gradient out of its compact form
## (input_grad_spread): input position (i * SH - PT, j * SW - PL), the one the kernel reads
## for output position (i, j), receives the compact gradient's (i, j); no tap reaches any
## other position, so it gets zero. Copied bit for bit as words (word_t).
##
## Global range: (width, height, batch * channels).
<%
    SH, SW = stride
%>\
typedef ${idx_t} idx_t;

__kernel void spread(${parameters})
{
    const int iw = get_global_id(0);
    const int ih = get_global_id(1);
    const idx_t plane = get_global_id(2);
    const int i = (ih + ${pad_top}) / ${SH};
    const int j = (iw + ${pad_left}) / ${SW};
    const bool read = i * ${SH} == ih + ${pad_top} && j * ${SW} == iw + ${pad_left}
        && i < ${rows} && j < ${cols};
    dx[dx_off + (plane * ${height} + ih) * ${width} + iw] =
        read ? compact[(plane * ${rows} + i) * ${cols} + j] : 0;
}
