"""The frozen language model: loading (hub / local folder / GGUF / random, `load`), one runner
protocol over its backends (`runner`: HookedTransformer, the lean forward `fastlm`,
TransformerBridge), `SAETransformer` with the SAEs spliced in (`splice`), and run directories on
disk (`checkpoint`)."""
