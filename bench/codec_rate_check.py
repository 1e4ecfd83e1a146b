"""Does the mean per-batch hard entropy of a trained codec under-count the pooled rate its coder pays?

Random batches of 64 training frames through a recipe dense.pt: the mean of the batches' own code entropies,
the entropy of all their codes pooled, and train-mode against eval-mode codes of the same weights.

    AN4_ROOT=../shared/data/an4 python bench/codec_rate_check.py outputs/codec/<run>
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from csprune.train.checkpoint import load_checkpoint
from csprune.train.an4 import read_an4_split
from recipes.codec.run import build_codec
from recipes.codec.data import FrameBank
from csprune.train.an4 import default_an4_root
run = sys.argv[1]
init = load_checkpoint(f"{run}/dense.pt")
codec = build_codec(init["model_config"], init["lpc_config"])
codec.model.load_state_dict(init["model"]); codec.model.eval()
utts = read_an4_split(default_an4_root(), "train")
bank = FrameBank(utts, -26.0, codec.signal_frames)
g = torch.Generator().manual_seed(0)
K = codec.model.stages[0].quantizer.num_centroids
M = codec.model.num_modules
pooled = [torch.zeros(K) for _ in range(M)]
batch_h = [[] for _ in range(M)]
ema = [None]*M; ce = [[] for _ in range(M)]
cps = codec.codes_per_second
with torch.no_grad():
    for b in range(300):
        idx = torch.randint(len(bank), (64,), generator=g)
        view = codec.training_view(bank.frames[idx])
        for m, (st, code) in enumerate(zip(codec.model.stages, codec.model.encode(view["input"]))):
            c = st.quantizer.count_codes(code); f = c / c.sum()
            nz = f[f > 0]; batch_h[m].append(float(-(nz*nz.log2()).sum()))
            pooled[m] += c
            ema[m] = f.clone() if ema[m] is None else 0.99*ema[m] + 0.01*f
            ce[m].append(float(-(f[f>0]*ema[m][f>0].log2()).sum()))
for m in range(M):
    p = pooled[m]/pooled[m].sum(); nz = p[p>0]
    H = float(-(nz*nz.log2()).sum())
    print(f"module {m}: mean batch H {sum(batch_h[m])/len(batch_h[m])*cps/1000:.2f} kbit/s, pooled H {H*cps/1000:.2f}, "
          f"mean CE under running EMA (last 200) {sum(ce[m][100:])/200*cps/1000:.2f}")
# train-mode forward on the same kind of batches
g = torch.Generator().manual_seed(0)
tr = [[] for _ in range(M)]; ev = [[] for _ in range(M)]
for b in range(50):
    idx = torch.randint(len(bank), (64,), generator=g)
    view = codec.training_view(bank.frames[idx])
    codec.model.train()
    with torch.no_grad():
        out = codec.model(view["input"])
    for m in range(M): tr[m].append(out["modules"][m]["hard_entropy"])
    codec.model.eval()
    with torch.no_grad():
        out = codec.model(view["input"])
    for m in range(M): ev[m].append(out["modules"][m]["hard_entropy"])
for m in range(M):
    print(f"module {m}: train-mode batch H {sum(tr[m])/50*cps/1000:.2f}, eval-mode {sum(ev[m])/50*cps/1000:.2f}")
