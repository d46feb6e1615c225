"""Emulates attn_mma_kernel (attn-mma.patch beside this file) lane by lane, with the m16n8k16
fragment layouts of the PTX ISA, against softmax attention in float64: `python3
sim_attn_mma.py` prints the relative error of each case (about 1e-4: P rounded to fp16)."""
import numpy as np

rng = np.random.default_rng(1)

def frag_A(regs):  # regs[lane][4 regs][2 halves] -> A[16][16]
    A = np.zeros((16, 16))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for r in range(4):
            row = g + 8 * (r & 1)
            col = t * 2 + 8 * (r >> 1)
            A[row, col], A[row, col + 1] = regs[lane][r]
    return A

def frag_B(regs):  # regs[lane][2 regs][2 halves] -> B[16][8]
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for r in range(2):
            k = t * 2 + 8 * r
            B[k, g], B[k + 1, g] = regs[lane][r]
    return B

def frag_C_get(C):  # C[16][8] -> per lane 4 floats
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out.append([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]])
    return out

def frag_C_set(vals):
    C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = vals[lane]
    return C

def mma(c, a, b):  # per-lane lists
    return frag_C_get(frag_A(a) @ frag_B(b) + frag_C_set(c))

def f16(x):
    return np.float16(x).astype(np.float64)

def run(G, D, p, splits, W=4, window=0):
    Hkv, S = 1, p + 50
    q = f16(rng.standard_normal((G, D)))
    K = f16(rng.standard_normal((S, D)))
    V = f16(rng.standard_normal((S, D)))
    scale = D ** -0.5
    qs = scale * 1.4426950408889634
    lo = max(0, p - window + 1) if window > 0 else 0
    n = p + 1 - lo
    ln = (n + splits - 1) // splits
    KK, NT = D // 16, D // 8
    states = []
    for split in range(splits):
        k0, k1 = lo + split * ln, min(lo + n, lo + split * ln + ln)
        warps = []
        for warp in range(W):
            # per-lane state
            qa = []
            for lane in range(32):
                gid, tig = lane >> 2, lane & 3
                def qrow(r):
                    return q[r, tig * (D // 4): tig * (D // 4) + D // 4] if r < G else np.zeros(D // 4)
                w0, w1 = qrow(gid), qrow(gid + 8)
                # word i = values (2i, 2i+1)
                qa.append([[(w0[4 * kk], w0[4 * kk + 1]), (w1[4 * kk], w1[4 * kk + 1]),
                            (w0[4 * kk + 2], w0[4 * kk + 3]), (w1[4 * kk + 2], w1[4 * kk + 3])]
                           for kk in range(KK)])
            o = [[[0.0] * 4 for _ in range(NT)] for _ in range(32)]
            m0 = [-3.4e38] * 32; m1 = [-3.4e38] * 32; l0 = [0.0] * 32; l1 = [0.0] * 32
            c0 = k0 + warp * 16
            while c0 < k1:
                sc = [[[0.0] * 4 for _ in range(32)] for _ in range(2)]
                for t in range(2):
                    for kk in range(KK):
                        a = [qa[lane][kk] for lane in range(32)]
                        b = []
                        for lane in range(32):
                            gid, tig = lane >> 2, lane & 3
                            key = min(c0 + 8 * t + gid, k1 - 1)
                            row = K[key, tig * (D // 4): tig * (D // 4) + D // 4]
                            b.append([(row[4 * kk], row[4 * kk + 1]), (row[4 * kk + 2], row[4 * kk + 3])])
                        sc[t] = mma(sc[t], a, b)
                # softmax per lane (with group shuffles)
                b0 = [-np.inf] * 32; b1 = [-np.inf] * 32
                for lane in range(32):
                    tig = lane & 3
                    for t in range(2):
                        for j in range(2):
                            inn = c0 + 8 * t + 2 * tig + j < k1
                            sc[t][lane][j] = sc[t][lane][j] * qs if inn else -np.inf
                            sc[t][lane][2 + j] = sc[t][lane][2 + j] * qs if inn else -np.inf
                            b0[lane] = max(b0[lane], sc[t][lane][j]); b1[lane] = max(b1[lane], sc[t][lane][2 + j])
                for d in (1, 2):
                    b0 = [max(b0[l], b0[l ^ d]) for l in range(32)]
                    b1 = [max(b1[l], b1[l ^ d]) for l in range(32)]
                pa = []
                corr = []
                for lane in range(32):
                    n0, n1 = max(m0[lane], b0[lane]), max(m1[lane], b1[lane])
                    c0r, c1r = 2 ** (m0[lane] - n0), 2 ** (m1[lane] - n1)
                    m0[lane], m1[lane] = n0, n1
                    pr = [[2 ** (sc[t][lane][j] - (n0 if j < 2 else n1)) for j in range(4)] for t in range(2)]
                    l0[lane] = l0[lane] * c0r + sum(pr[t][j] for t in range(2) for j in range(2))
                    l1[lane] = l1[lane] * c1r + sum(pr[t][j] for t in range(2) for j in (2, 3))
                    pa.append([(f16(pr[0][0]), f16(pr[0][1])), (f16(pr[0][2]), f16(pr[0][3])),
                               (f16(pr[1][0]), f16(pr[1][1])), (f16(pr[1][2]), f16(pr[1][3]))])
                    corr.append((c0r, c1r))
                for t in range(NT):
                    b = []
                    for lane in range(32):
                        gid, tig = lane >> 2, lane & 3
                        o[lane][t] = [o[lane][t][0] * corr[lane][0], o[lane][t][1] * corr[lane][0],
                                      o[lane][t][2] * corr[lane][1], o[lane][t][3] * corr[lane][1]]
                        keys = [min(c0 + 2 * tig + (r & 1) + 8 * (r >> 1), k1 - 1) for r in range(4)]
                        dim = gid * (D // 8) + t
                        b.append([(V[keys[0], dim], V[keys[1], dim]), (V[keys[2], dim], V[keys[3], dim])])
                    res = mma([o[lane][t] for lane in range(32)], pa, b)
                    for lane in range(32):
                        o[lane][t] = res[lane]
                c0 += W * 16
            for d in (1, 2):
                l0 = [l0[l] + l0[l ^ d] for l in range(32)]
                l1 = [l1[l] + l1[l ^ d] for l in range(32)]
            # the warp's state per head
            st = {}
            for lane in range(32):
                gid, tig = lane >> 2, lane & 3
                for half in range(2):
                    g = gid + 8 * half
                    if g < G:
                        ent = st.setdefault(g, [None, None, np.zeros(D)])
                        if tig == 0:
                            ent[0] = m1[lane] if half else m0[lane]
                            ent[1] = l1[lane] if half else l0[lane]
                        for t in range(NT):
                            for j in range(2):
                                ent[2][(2 * tig + j) * (D // 8) + t] = o[lane][t][2 * half + j]
            warps.append(st)
        states.append(warps)
    # merge all warps of all splits per head
    out = np.zeros((G, D))
    for g in range(G):
        ms = [w[g][0] for sp in states for w in sp if w[g][1] > 0]
        mm = max(ms)
        num = sum(2 ** (w[g][0] - mm) * w[g][2] for sp in states for w in sp if w[g][1] > 0)
        den = sum(2 ** (w[g][0] - mm) * w[g][1] for sp in states for w in sp if w[g][1] > 0)
        out[g] = num / den
    s = (q @ K[lo:p + 1].T) * scale
    w = np.exp(s - s.max(1, keepdims=True)); w /= w.sum(1, keepdims=True)
    want = w @ V[lo:p + 1]
    return np.abs(out - want).max() / np.abs(want).max()

for G, D, p, splits, window in [(4, 128, 200, 3, 0), (8, 128, 77, 2, 0), (1, 64, 40, 1, 0),
                                (16, 64, 150, 4, 0), (7, 128, 99, 2, 30), (3, 64, 5, 2, 0)]:
    print(G, D, p, splits, window, f"{run(G, D, p, splits, window=window):.2e}")
