"""Models as tools: schema (tool definitions + validation), toolmaker (tool sets), toolactor
(observations: corpus / LLM / HTTP backends, SQLite cache), autoagent (SFT traces); the corpus backend's
parts: corpus, bm25 (ranking on bm25s), exact (calculator, compare); json_extract (JSON from model
replies, json_repair), jsonl (strict JSONL reading). Import the submodules."""
