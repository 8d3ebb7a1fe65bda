## Local-memory tiled implicit GEMM, for devices whose local memory is real (GPUs): the
## output (channels x positions) = weights (channels x cin*KH*KW) times the input windows,
## read from the same grid as implicit_gemm.cl.mako (the staged input, or the input itself).
##
## A work-group of ndim x mdim work-items computes mwg output channels x nwg grid positions.
## The K dimension goes in chunks of cib input channels (KWG = cib * KH * KW values): the
## work-group copies the chunk's weight tile (KWG x mwg) and input tile (KWG x nwg) into local
## memory, waits, and each work-item accumulates its MWI x NWI outputs from there (channels
## ty + i * mdim, positions tx + j * ndim: neighbouring work-items read neighbouring local
## words and store neighbouring outputs). Every work-item reaches every barrier: the range
## is whole work-groups, and out-of-range tile entries load as zeros or are never stored.
<%namespace name="c" file="common.cl.mako"/>\
<%
    KH, KW = kernel_size
    NPH, NPW = grid.phases
    KHW = KH * KW
    KWG = cib * KHW                             # K values per chunk
    MWI, NWI = mwg // mdim, nwg // ndim         # outputs per work-item
    WGS = mdim * ndim
    plane, cols, ends = grid.plane, grid.cols, grid.positions
    channel_stride = grid.channel_stride        # one input channel's planes
    m_blocks = channel_blocks.count
    chunks = -(-cin_g // cib)
    # Each K value of a chunk: its input channel within the chunk and its tap's offset
    # within the channel's planes, as tables so that the loads need no run-time division by
    # KH * KW.
    k_channel = [k // KHW for k in range(KWG)]
    k_tap = [grid.tap_rows[k % KHW // KW] + grid.tap_cols[k % KW] for k in range(KWG)]
    # Loads per work-item: the weight tile by (channel ty + i * mdim, K tx + j * ndim), the
    # input tile by (K ty + i * mdim, position tx + j * ndim).
    w_k_steps = -(-KWG // ndim)
    x_k_steps = -(-KWG // mdim)
%>\
${c.header(storage_t, acc_t)}
typedef ${idx_t} idx_t;
__constant int k_channel[${KWG}] = {${', '.join(map(str, k_channel))}};
__constant int k_tap[${KWG}] = {${', '.join(map(str, k_tap))}};

__kernel __attribute__((reqd_work_group_size(${ndim}, ${mdim}, 1)))
void tiled_gemm(
    ${parameters})
{
    __local ${acc_t} wl[${KWG}][${mwg}];
    __local ${acc_t} xl[${KWG}][${nwg}];
    const int tx = get_local_id(0);
    const int ty = get_local_id(1);
    const int p0 = get_group_id(0) * ${nwg};
    const int mb = get_group_id(1);
    const int n = get_global_id(2);
    const int g = mb / ${m_blocks};
    const int k0 = (mb - g * ${m_blocks}) * ${mwg};
    __global const ${storage_t} *xg = x + x_off + ((idx_t)n * ${cin} + g * ${cin_g}) * ${channel_stride};
    __global const ${storage_t} *wg = w + w_off + (idx_t)(g * ${cout_g} + k0) * ${cin_g * KHW};
% for i in range(MWI):
% for j in range(NWI):
    ${acc_t} acc${i}_${j} = 0;
% endfor
% endfor

    for (int chunk = 0; chunk < ${chunks}; ++chunk) {
        const int kk0 = chunk * ${KWG};             // the chunk's first K value
% for i in range(MWI):
% for j in range(w_k_steps):
        {
            const int m = ty + ${i * mdim};
            const int k = tx + ${j * ndim};
% if (j + 1) * ndim > KWG:
            if (k < ${KWG})
% endif
                wl[k][m] = (k0 + m < ${cout_g} && kk0 + k < ${cin_g * KHW})
                    ? LOAD(wg, (idx_t)m * ${cin_g * KHW} + kk0 + k) : (${acc_t})0;
        }
% endfor
% endfor
% for i in range(x_k_steps):
        {
            const int k = ty + ${i * mdim};
% if (i + 1) * mdim > KWG:
            if (k < ${KWG}) {
% else:
            {
% endif
                const int ci = chunk * ${cib} + k_channel[k];
                __global const ${storage_t} *xc = xg + (idx_t)min(ci, ${cin_g - 1}) * ${channel_stride};
% for j in range(NWI):
<% pos = 'p0 + tx + %d + k_tap[k]' % (j * ndim) %>\
% if grid.staged:
                xl[k][tx + ${j * ndim}] = ci < ${cin_g} ? LOAD(xc, ${pos}) : (${acc_t})0;
% else:
## Unstaged, the last tiles reach past the input: clamped there (those positions are never
## stored).
                xl[k][tx + ${j * ndim}] = ci < ${cin_g} ? LOAD(xc, min(${pos}, ${plane - 1})) : (${acc_t})0;
% endif
% endfor
            }
        }
% endfor
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int k = 0; k < ${KWG}; ++k) {
% for i in range(MWI):
            const ${acc_t} wv${i} = wl[k][ty + ${i * mdim}];
% endfor
% for j in range(NWI):
            const ${acc_t} xv${j} = xl[k][tx + ${j * ndim}];
% endfor
% for i in range(MWI):
% for j in range(NWI):
            acc${i}_${j} += wv${i} * xv${j};
% endfor
% endfor
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

% for i in range(MWI):
    {
        const int m = k0 + ty + ${i * mdim};
        if (m < ${cout_g}) {
            const idx_t yc = ((idx_t)n * ${cout} + g * ${cout_g} + m) * ${h_out * w_out};
% if has_bias:
            const ${acc_t} bias = LOAD(b, b_off + g * ${cout_g} + m);
% endif
% for j in range(NWI):
            {
                const int p = p0 + tx + ${j * ndim};
                const int oh = p / ${cols};
                const int ow = p - oh * ${cols};
                if (ow < ${w_out} && p < ${ends})
                    ${c.epilogue_store(storage_t, activation, has_residual, 'acc%d_%d%s' % (i, j, ' + bias' if has_bias else ''), acc_t, 1, 'yc + oh * %d + ow' % w_out)};
            }
% endfor
        }
    }
% endfor
}
