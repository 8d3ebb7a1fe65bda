## A depthwise weight turned around: wf[c][i][j] = w[c][KH-1-i][KW-1-j] (one input channel per
## group, so each channel's filter is its own), copied bit for bit as words (word_t).
## Global range: (KH * KW, channels).
<%
    KH, KW = kernel_size
%>\
__kernel void flip_weight(
    ${parameters})
{
    const int t = get_global_id(0);
    const int c = get_global_id(1);
    if (t >= ${KH * KW} || c >= ${channels})
        return;
    const int i = t / ${KW};
    const int j = t - i * ${KW};
    wf[c * ${KH * KW} + t] = w[w_off + c * ${KH * KW} + (${KH - 1} - i) * ${KW} + ${KW - 1} - j];
}
