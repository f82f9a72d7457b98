"""Random-weight copies of a GGUF model, for benchmarking where the real file
cannot travel (a device machine takes 64 MiB; the default model is 98 MB).

    python3 scripts/synth_gguf.py skeleton SRC.gguf SKELETON.gguf
        every metadata key of SRC (tokenizer, chat template, shapes) and the
        list of its tensors (name, shape, type), but no tensor data
    python3 scripts/synth_gguf.py fill SKELETON.gguf OUT.gguf [--f16]
        a model with the skeleton's metadata and tensors of random blocks;
        --f16 stores every quantized matrix as F16 instead

Speed does not depend on the values; the scales are set so that no block holds
a NaN or an infinity. The weights mean nothing.
"""
import json
import sys

import numpy as np
import gguf

KEY = "kvsieve.skeleton.tensors"
Q = gguf.GGMLQuantizationType
T = gguf.GGUFValueType


def copy_fields(r, w, skip):
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in skip:
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == T.ARRAY else None
        w.add_key_value(k, f.contents(), vtype, sub_type=sub)


def skeleton(src, out):
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch)
    copy_fields(r, w, set())
    # GGUF lists dimensions fastest first; numpy shapes are the reverse.
    tensors = [(t.name, [int(x) for x in reversed(t.shape.tolist())], int(t.tensor_type)) for t in r.tensors]
    w.add_string(KEY, json.dumps(tensors))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def blocks(rng, ty, shape):
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    bs, bb = gguf.GGML_QUANT_SIZES[ty]
    n = rows * cols // bs
    b = rng.integers(0, 256, size=(n, bb), dtype=np.uint8)
    d = np.full(n, 0.002, dtype=np.float16).view(np.uint8).reshape(n, 2)
    if ty in (Q.Q4_0, Q.Q8_0):  # d first
        b[:, 0:2] = d
    elif ty in (Q.Q4_1, Q.Q4_K):  # d and m (dmin) first
        b[:, 0:2] = d
        b[:, 2:4] = d
    elif ty == Q.Q6_K:  # d last
        b[:, bb - 2 : bb] = d
    else:
        raise SystemExit(f"no random blocks for type {ty.name}")
    return b.reshape(*shape[:-1], cols // bs * bb)


def fill(skel, out, f16):
    r = gguf.GGUFReader(skel)
    arch = r.fields["general.architecture"].contents()
    tensors = json.loads(r.fields[KEY].contents())
    w = gguf.GGUFWriter(out, arch)
    copy_fields(r, w, {KEY, "general.file_type"})
    rng = np.random.default_rng(0)
    for name, shape, ty in tensors:
        ty = Q(ty)
        if ty == Q.F32 or len(shape) == 1:
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
        elif f16 or ty == Q.F16:
            w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
        else:
            w.add_tensor(name, blocks(rng, ty, shape), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    cmd, a, b = sys.argv[1:4]
    if cmd == "skeleton":
        skeleton(a, b)
    elif cmd == "fill":
        fill(a, b, "--f16" in sys.argv[4:])
    else:
        raise SystemExit(__doc__)
