import sys, time, json
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[4]))
from nmt.translate import Translator
t = Translator.load("/work/main/exp/de-en-lr2e3", device="cpu", precision=sys.argv[2], log=lambda s: None)
lines = open("/work/main/exp/de-en-lr2e3/data/test.src").read().splitlines()
beam = int(sys.argv[3])
t.translations(lines[:64], beam=beam)  # warm up
s = time.perf_counter(); out = t.translations(lines, beam=beam); e = time.perf_counter()
print(json.dumps({"sent_per_s": len(lines) / (e - s)}))
