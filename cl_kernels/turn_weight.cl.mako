## The weight turned for the input gradient's forward form: wt[g][c][k][KHW-1-tap] =
## w[g][k][c][tap] (each group's output and input channels swapped, each filter's rows and
## columns reversed), copied bit for bit as words (word_t). Read in order, written strided
## (as transpose_weight).
## Global range: (input channels per group x taps, groups x output channels per group).
<%
    KHW = kernel_size[0] * kernel_size[1]
%>\
__kernel void turn_weight(
    ${parameters})
{
    const int ct = get_global_id(0);            // input channel c and tap, as c * KHW + tap
    const int gk = get_global_id(1);            // group g and output channel k
    if (ct >= ${cin_g * KHW} || gk >= ${groups * cout_g})
        return;
    const int g = gk / ${cout_g};
    const int k = gk - g * ${cout_g};
    const int c = ct / ${KHW};
    const int tap = ct - c * ${KHW};
    wt[(((${idx_t})g * ${cin_g} + c) * ${cout_g} + k) * ${KHW} + ${KHW - 1} - tap] = w[w_off + (${idx_t})gk * ${cin_g * KHW} + ct];
}
