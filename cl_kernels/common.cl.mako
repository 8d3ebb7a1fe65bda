## Shared pieces of every clconv kernel: storage/compute types and padding index maps.
##
## Storage type T may be half, float or double; arithmetic happens in acc_t (float for half).
## half is read and written through vload_half/vstore_half, which are core OpenCL and so need
## no cl_khr_fp16.

<%def name="header(storage_t, acc_t)">\
% if storage_t == 'double' or acc_t == 'double':
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif
% if storage_t == 'half':
#define LOAD(p, i) vload_half((i), (p))
#define STORE(v, p, i) vstore_half_rte((v), (i), (p))
% else:
#define LOAD(p, i) ((${acc_t})(p)[i])
#define STORE(v, p, i) ((p)[i] = (v))
% endif
</%def>

## A vector of n consecutive elements from p + i, as acc_t vector (or scalar when n == 1).
## float/double vectors are built from scalar loads, which LLVM merges into one unaligned
## vector load; PoCL's vloadn/vstoren are out-of-line calls (10x slower in the inner loop).
<%def name="load_vec(storage_t, n, p, i)">\
% if n == 1:
LOAD(${p}, ${i})\
% elif storage_t == 'half':
vload_half${n}(0, ${p} + (${i}))\
% else:
(${storage_t}${n})(${', '.join('(%s + (%s))[%d]' % (p, i, j) for j in range(n))})\
% endif
</%def>

<%def name="store_vec(storage_t, n, v, p, i)">\
% if n == 1 and storage_t == 'half':
vstore_half_rte(${v}, ${i}, ${p})\
% elif n == 1:
(${p})[${i}] = ${v}\
% elif storage_t == 'half':
vstore_half${n}_rte(${v}, 0, ${p} + (${i}))\
% else:
${', '.join('(%s)[(%s) + %d] = %s' % (p, i, j, capture(lane, v, n, j)) for j in range(n))}\
% endif
</%def>

## Map a coordinate in the padded input (may be negative or past the end) to the input
## coordinate that torch's padding mode reads there, clamped into the input so that lanes past
## the output's end (which are never stored) still read in bounds. 'replicate' is the clamp
## itself; callers handle 'zeros' first (they mask the value out). (Reflection negates
## through mad24: a plain -i here was turned into llvm.abs, which Oclgrind 21.10 cannot run.)
<%def name="padded_index(mode, i, size)">\
% if mode == 'reflect':
clamp(${i} < 0 ? mad24(${i}, -1, 0) : (${i} >= ${size} ? ${2 * size - 2} - (${i}) : (${i})), 0, ${size - 1})\
% elif mode == 'circular':
clamp(${i} < 0 ? (${i}) + ${size} : (${i} >= ${size} ? (${i}) - ${size} : (${i})), 0, ${size - 1})\
% else:
clamp(${i}, 0, ${size - 1})\
% endif
</%def>

## The value that element col (an expression) of row p stands for under the padding mode: 0
## outside the row for 'zeros' (the clamped load stays in bounds), else the mapped element.
<%def name="padded_load(mode, acc_t, p, col, size)">\
% if mode == 'zeros':
((uint)(${col}) < ${size}u ? LOAD(${p}, clamp(${col}, 0, ${size - 1})) : (${acc_t})0)\
% else:
LOAD(${p}, ${padded_index(mode, col, size)})\
% endif
</%def>

## Lane j of an n-wide vector variable (the variable itself when n == 1).
<%def name="lane(v, n, j)">\
${v}${'' if n == 1 else '.s' + '0123456789abcdef'[j]}\
</%def>

## The fused activation of a conv's output value v (a scalar or a vector of type t), as
## torch computes it: NaN passes through relu and relu6; gelu is the exact (erf) form.
<%def name="activate(activation, v, t)">\
% if activation is None:
${v}\
% elif activation == 'relu':
(${v} < (${t})0 ? (${t})0 : ${v})\
% elif activation == 'relu6':
(${v} < (${t})0 ? (${t})0 : (${v} > (${t})6 ? (${t})6 : ${v}))\
% elif activation == 'silu':
(${v} / ((${t})1 + exp(-${v})))\
% elif activation == 'gelu':
((${t})0.5 * ${v} * ((${t})1 + erf(${v} * (${t})${'M_SQRT1_2' if t.startswith('double') else 'M_SQRT1_2_F'})))\
% endif
</%def>

## The sum of the n lanes (n <= 8) of vector v (of scalar type t). Through dot(): Oclgrind
## 21.10's uninitialised-value check crashed on lane extracts of a vector carried through a
## loop.
<%def name="lane_sum(v, n, t)">\
% if n == 1:
${v}\
% elif n <= 4:
dot(${v}, (${t}${n})1)\
% else:
(${lane_sum('(%s).lo' % v, n // 2, t)} + ${lane_sum('(%s).hi' % v, n // 2, t)})\
% endif
</%def>

## Declare `const t name` = the sum of the n lanes of v, plus extra (an expression's text).
## 16 lanes go through a private array: Oclgrind 21.10 takes the halves of a 16-wide vector
## (shuffles) for uninitialised values, and crashes on its lane extracts.
<%def name="lane_total(name, v, n, t, extra='')">\
% if n == 16:
${t} ${name}_lanes[16]; vstore16(${v}, 0, ${name}_lanes);
    const ${t} ${name} = ${' + '.join('%s_lanes[%d]' % (name, j) for j in range(16))}${extra};\
% else:
const ${t} ${name} = ${lane_sum(v, n, t)}${extra};\
% endif
</%def>

## Store n values v (acc_t, a vector when n > 1) at output index i: plus the residual, then
## the activation, in the one pass over the output (kernel arguments y, y_off, res, res_off).
<%def name="epilogue_store(storage_t, activation, has_residual, v, acc_t, n, i)">\
<%
    vt = acc_t + (str(n) if n > 1 else '')
    if has_residual:
        v = '(%s + %s)' % (v, capture(load_vec, storage_t, n, 'res', 'res_off + ' + i))
    v = capture(activate, activation, v, vt)
%>\
{ const ${vt} e = ${v}; ${store_vec(storage_t, n, 'e', 'y', 'y_off + ' + i)}; }\
</%def>
