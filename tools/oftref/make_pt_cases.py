"""Writes tests/fixtures/torch-pt/: small files saved by the real torch.save, for the C# reader's tests
(TorchStateDictTests). Needs Debian's python3-torch. Values are simple formulas the test recomputes."""
import collections, io, os, pickle, zipfile, torch

out = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "torch-pt")
os.makedirs(out, exist_ok=True)

# 1. A module's state dict, float32, keys prefixed by DDP's "module.".
lin = torch.nn.Linear(3, 2)
with torch.no_grad():
    lin.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) * 0.5 - 1)
    lin.bias.copy_(torch.tensor([0.25, -0.75]))
sd = collections.OrderedDict((f"module.{k}", v) for k, v in lin.state_dict().items())
torch.save(sd, os.path.join(out, "ddp_f32.pt"))

# 2. bfloat16, with views: a transposed (non-contiguous) tensor, a slice with a storage offset, and two tensors
#    sharing one storage.
base = (torch.arange(24, dtype=torch.float32) / 8 - 1.5).to(torch.bfloat16)
m = base.reshape(4, 6)
torch.save({"t": m.t(), "slice": base[5:11], "shared_a": m, "shared_b": m[1:3, 2:5], "scalar": base[7]},
           os.path.join(out, "bf16_views.pt"))

# 3. float16 and float64 and int64.
torch.save({"h": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
            "d": torch.tensor([[1e-3, 2.0]], dtype=torch.float64),
            "i": torch.tensor([3, -4], dtype=torch.int64)}, os.path.join(out, "mixed_types.pt"))

# 4. A hostile file: a state dict whose pickle calls os.system when loaded by an unrestricted unpickler.
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/openvla-pickle-pwned",))
torch.save({"weight": Evil()}, os.path.join(out, "hostile_global.pt"))

# 5. Not a zip at all (the legacy format, or garbage).
with open(os.path.join(out, "not_a_zip.pt"), "wb") as f:
    f.write(pickle.dumps({"a": 1}, protocol=2))
print("wrote", sorted(os.listdir(out)))
