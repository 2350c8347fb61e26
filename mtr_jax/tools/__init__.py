"""Models as tools: schema (tool definitions + validation), toolmaker (tool sets), toolactor
(observations: corpus BM25 / LLM / HTTP, SQLite cache), autoagent (SFT traces). Import the submodules."""
