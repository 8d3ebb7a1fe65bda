## The weight with each group's output and input channels swapped, copied bit for bit as
## words (word_t): wt[g][c][k][tap'] = w[g][k][c][tap], where tap' = tap (transpose_weight:
## the input gradient's GEMM then reads each input channel's taps over consecutive output
## channels from one run of memory) or KHW - 1 - tap (turn_weight: each filter's rows and
## columns reversed too, for the input gradient's forward form).
##
## A work-item swaps a block of `block` output x `block` input channels: it writes runs of
## consecutive output channels and reads `block` rows that stay in the caches meanwhile (one
## element per work-item made a CPU scatter every store: 2.8-5 ms for an 8 MB weight).
## Global range: (input channel blocks, groups x output channel blocks).
<%
    KHW = kernel_size[0] * kernel_size[1]
    B = block
    CB, KB = -(-cin_g // B), -(-cout_g // B)
%>\
__kernel void ${function}(
    ${parameters})
{
    const int cb = get_global_id(0);
    const int gkb = get_global_id(1);
    if (cb >= ${CB} || gkb >= ${groups * KB})
        return;
    const int g = gkb / ${KB};
    const int k0 = (gkb - g * ${KB}) * ${B};
    const int c0 = cb * ${B};
    const int kn = min(${B}, ${cout_g} - k0);
    const int cn = min(${B}, ${cin_g} - c0);
    __global const ${word_t} *src = w + w_off + ((${idx_t})g * ${cout_g} + k0) * ${cin_g * KHW} + c0 * ${KHW};
    __global ${word_t} *dst = wt + (((${idx_t})g * ${cin_g} + c0) * ${cout_g} + k0) * ${KHW};
    for (int cc = 0; cc < cn; ++cc)
        for (int kk = 0; kk < kn; ++kk)
            for (int tap = 0; tap < ${KHW}; ++tap)
                dst[(cc * ${cout_g} + kk) * ${KHW} + ${f'{KHW - 1} - tap' if reverse_taps else 'tap'}] = src[kk * ${cin_g * KHW} + cc * ${KHW} + tap];
}
