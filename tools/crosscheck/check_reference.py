"""Compares what OpenVLA.NET computes (exported by `dotnet run -- DIR` in this folder) with the reference Python
libraries: sentencepiece (and transformers' LlamaTokenizer when installed) for the prompt ids of our generated
tokenizer.model, and Pillow + torchvision (the PrismaticImageProcessor pipeline: bicubic antialiased resize,
to_tensor, normalize with the bf16-rounded DINOv2 statistics) for pixel_values. Prints a report; exit 1 on mismatch."""
import json, sys, os
import numpy as np

d = sys.argv[1] if len(sys.argv) > 1 else "crosscheck-out"
ok = True

import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
prompts = json.load(open(os.path.join(d, "prompts.json")))
bad = 0
for instr, ours in prompts.items():
    text = f"In: What action should the robot take to {instr.lower()}?\nOut:"
    ref = [sp.bos_id()] + sp.encode(text)
    if ref[-1] != sp.piece_to_id("\u2581"):
        ref.append(sp.piece_to_id("\u2581"))
    if ref != ours:
        bad += 1
        print("TOKEN MISMATCH", repr(instr), "\n  ours", ours, "\n  ref ", ref)
print(f"sentencepiece {spm.__version__}: {len(prompts) - bad}/{len(prompts)} prompts give identical ids")
ok &= bad == 0
try:
    from transformers import LlamaTokenizer
    hf = LlamaTokenizer(vocab_file=os.path.join(d, "tokenizer.model"), legacy=True)
    bad_hf = 0
    for instr, ours in prompts.items():
        ids = hf(f"In: What action should the robot take to {instr.lower()}?\nOut:").input_ids
        if ids[-1] != 259:
            ids = ids + [259]
        bad_hf += ids != ours
    print(f"transformers LlamaTokenizer (legacy): {len(prompts) - bad_hf}/{len(prompts)} identical")
    ok &= bad_hf == 0
except Exception as e:  # transformers missing or too new for this call
    print("transformers check skipped:", type(e).__name__, e)

from PIL import Image
import PIL
try:
    import torch
    import torchvision.transforms.functional as TVF
except ImportError:  # Pillow alone reproduces what torchvision does on a PIL image
    TVF = None
mean = [[0.484375, 0.455078125, 0.40625], [0.5, 0.5, 0.5]]
std = [[0.228515625, 0.2236328125, 0.224609375], [0.5, 0.5, 0.5]]
for f in json.load(open(os.path.join(d, "frames.json"))):
    img = Image.open(os.path.join(d, f["file"])).convert("RGB")
    for s in (224, 56):
        ours = np.fromfile(os.path.join(d, f["file"].replace(".png", f"_{s}.f32")), dtype=np.float32).reshape(6, s, s)
        if TVF is not None:
            resized = TVF.resize(img, [s, s], interpolation=TVF.InterpolationMode.BICUBIC, antialias=True)
            t = TVF.to_tensor(resized)
            ref = torch.cat([TVF.normalize(t, mean[0], std[0]), TVF.normalize(t, mean[1], std[1])]).numpy()
        else:
            t = np.asarray(img.resize((s, s), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
            ref = np.concatenate([(t - np.array(m, np.float32).reshape(3, 1, 1)) / np.array(sd, np.float32).reshape(3, 1, 1) for m, sd in zip(mean, std)])
        # Convert the difference back to 8-bit pixel units: < 0.5 means the same uint8 pixel.
        scale = np.array(std[0] + std[1], dtype=np.float32).reshape(6, 1, 1) * 255
        diff = np.abs(ours - ref) * scale
        same = (diff < 0.5).mean()
        print(f"{f['file']} {f['width']}x{f['height']} -> {s}: max |diff| {diff.max():.4f} px, identical pixels {same:.4%}")
        ok &= diff.max() < 0.5
print("Pillow", PIL.__version__, "torchvision" if TVF is not None else "(Pillow + numpy path)")
print("ALL MATCH" if ok else "MISMATCHES FOUND")
sys.exit(0 if ok else 1)
