"""hatrack beside other servers: export layouts, the vLLM resolver plugin, the Hub.
Torch-free; each integration imports its server's library lazily, if at all."""
