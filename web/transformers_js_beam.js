/**
 * Beam search for a vlmexport `--layout transformers.js` folder loaded by transformers.js.
 *
 * Why this file exists: @huggingface/transformers 4.3.2 accepts `num_beams` but does not search
 * beams — `PreTrainedModel.generate` (src/models/modeling_utils.js) keeps only the first token
 * its BeamSearchSampler returns ("TODO: Support beam search"), which is the greedy choice. So the
 * model is loaded and run by transformers.js unchanged (its processor, its sessions, its
 * `forward` with the cache), and the search itself is decoding.js's port of transformers'
 * `_beam_search`, the same one prefix_vlm.js and the Python runtime use.
 */
import { Tensor, ones } from '@huggingface/transformers';

import { beamSearch, decodeOptions } from './decoding.js';

/** `present.{i}.key` outputs of a forward pass → the `past_key_values.{i}.key` feeds of the next. */
function pastFrom(outputs) {
  const past = {};
  for (const [name, tensor] of Object.entries(outputs)) {
    if (name.startsWith('present')) past[name.replace('present', 'past_key_values')] = tensor;
  }
  return past;
}

/** Rows `rows` of a tensor along axis 0 (the beam reordering of a KV cache). */
function gatherRows(tensor, rows) {
  const [batch, ...rest] = tensor.dims;
  const size = tensor.data.length / batch;
  const data = new tensor.data.constructor(rows.length * size);
  rows.forEach((row, i) => data.set(tensor.data.subarray(row * size, (row + 1) * size), i * size));
  return new Tensor(tensor.type, data, [rows.length, ...rest]);
}

/** The last position's logits of each row: [rows, positions, vocab] → Float32Array(rows · vocab). */
function lastLogits(tensor) {
  const [rows, positions, vocab] = tensor.dims;
  const out = new Float32Array(rows * vocab);
  for (let r = 0; r < rows; r++) {
    const start = (r * positions + positions - 1) * vocab;
    out.set(tensor.data.subarray(start, start + vocab), r * vocab);
  }
  return out;
}

/**
 * Beam-search caption tokens (EOS excluded) for one image, with transformers' semantics.
 * @param {object} model what `AutoModelForImageTextToText.from_pretrained` returned
 * @param {object} inputs the processor's output for one image and the text "<image>"
 * @param {object} [options] decodeOptions() fields (numBeams, maxLength, lengthPenalty, ...)
 * @returns {Promise<number[]>}
 */
export async function beamSearchCaption(model, inputs, options = {}) {
  const generation = model.generation_config ?? {};
  const eos = Number(generation.eos_token_id ?? model.config.text_config?.eos_token_id);
  const settings = decodeOptions({ maxLength: generation.max_new_tokens ?? 30, numBeams: 3, ...options });
  const runner = {
    firstPass: async () => {
      const outputs = await model({ ...inputs });
      return { logits: lastLogits(outputs.logits), state: { past: pastFrom(outputs), length: inputs.input_ids.dims[1] } };
    },
    step: async (tokens, state, rows) => {
      const past = Object.fromEntries(Object.entries(state.past).map(([name, tensor]) => [name, gatherRows(tensor, rows)]));
      const input_ids = new Tensor('int64', BigInt64Array.from(tokens, BigInt), [tokens.length, 1]);
      const attention_mask = ones([tokens.length, state.length + 1]);
      const outputs = await model({ input_ids, attention_mask, past_key_values: past });
      return { logits: lastLogits(outputs.logits), state: { past: pastFrom(outputs), length: state.length + 1 } };
    },
  };
  return beamSearch(runner, settings, eos, null);
}
