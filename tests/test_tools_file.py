"""`data.tools` (make-tools output) is what GRPO rollouts, eval and make-traces offer: a tool that
only the file has appears in the rollout prompt the model sees."""

import json

import jax

from mtr_jax.config import ToolsConfig, load_config
from mtr_jax.data.demo_tokenizer import demo_tokenizer_for_world
from mtr_jax.data.synthetic import make_world, split_world
from mtr_jax.model import qwen2
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker, ToolSetMaker, tool
from mtr_jax.train.setup import make_toolmaker


def test_grpo_rollout_offers_the_tools_file(tmp_path):
    w = make_world(seed=0)
    train, _ = split_world(w, n_train=3, n_heldout=1, seed=0)
    extra = tool("zeta_registry", "Look a name up in the zeta registry.", {"name": {"type": "string"}}, ["name"],
                 {"type": "object", "properties": {"entry": {"type": "string"}}, "required": ["entry"]})
    path = tmp_path / "tools.jsonl"
    with open(path, "w") as f:
        for r in train[:2]:  # the third record is not in the file: it falls back, and is counted
            f.write(json.dumps({"id": r.id, "dataset": r.dataset, "tools": ToolMaker("template").make(r) + [extra]}) + "\n")
    cfg = load_config(None, [f"data.tools={path}", "grpo.batch_size=1", "grpo.group_size=2", "grpo.max_new_tokens=4",
                             "grpo.max_turns=1", "grpo.max_len=768"])
    maker = make_toolmaker(cfg)
    assert isinstance(maker, ToolSetMaker)
    tok = demo_tokenizer_for_world(w, vocab_size=1024)
    mc = qwen2.Qwen2Config(vocab_size=-(-len(tok) // 64) * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, eos_token_id=tok.eos_token_id)
    params = qwen2.init_params(mc, jax.random.PRNGKey(0))
    from mtr_jax.train.grpo import GRPOTrainer

    actor = ToolActor.from_config(ToolsConfig(), None)
    tr = GRPOTrainer(cfg, mc, params, tok, train, actor, maker)
    eps = tr.rollout([train[0]], jax.random.PRNGKey(0), 2)
    prompt = tok.decode(eps[0].token_ids[:eps[0].prompt_len])
    assert "zeta_registry" in prompt and "search" in prompt
    eps = tr.rollout([train[2]], jax.random.PRNGKey(0), 2)
    assert "zeta_registry" not in tok.decode(eps[0].token_ids[:eps[0].prompt_len]) and maker.missing == 1
