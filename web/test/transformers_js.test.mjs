/**
 * A `vlmexport export --layout transformers.js` folder loaded by the real transformers.js
 * (@huggingface/transformers, pinned in package.json) under Node, local files only.
 *
 * Reads the references tests/test_transformers_js.py computes with the Python runtime
 * (VLM_TJS_FIXTURE): per variant, the greedy and beam-search tokens of each image, and the
 * Python pixel values. Run it through `pytest tests/test_transformers_js.py`.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { AutoModelForImageTextToText, AutoProcessor, RawImage, Tensor, env } from '@huggingface/transformers';

import { beamSearchCaption } from '../transformers_js_beam.js';

const FIXTURE = process.env.VLM_TJS_FIXTURE;
const fixture = FIXTURE ? JSON.parse(readFileSync(FIXTURE, 'utf8')) : null;
const needsFixture = { skip: fixture ? false : 'VLM_TJS_FIXTURE is not set: run `pytest tests/test_transformers_js.py`' };

if (fixture) {
  // Nothing from a hub: the folder is found under localModelPath by its name.
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = path.dirname(fixture.bundle) + path.sep;
}

const floats = (b64) => {
  const buffer = Buffer.from(b64, 'base64');
  return new Float32Array(buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.length));
};

/** Generated ids after the prompt, up to (not including) the first EOS. */
function newTokens(sequences, promptLength, eos) {
  const ids = sequences.tolist()[0].slice(promptLength).map(Number);
  const at = ids.indexOf(eos);
  return at >= 0 ? ids.slice(0, at) : ids;
}

for (const variant of fixture?.variants ?? []) {
  test(`transformers.js ${variant.dtype}: processor + generate give the Python runtime's tokens`, needsFixture, async () => {
    const id = path.basename(fixture.bundle);
    const processor = await AutoProcessor.from_pretrained(id);
    const model = await AutoModelForImageTextToText.from_pretrained(id, { dtype: variant.dtype, device: 'cpu' });
    assert.equal(model.constructor.name, 'LlavaForConditionalGeneration');
    const [height, width] = fixture.pixel_dims.slice(-2);
    const pixelSize = 3 * height * width;
    const python = floats(fixture.pixels);
    const seen = { greedy: [], pixels: [], norepeat: [], beam: [], generateBeams: [] };
    for (const [i, file] of fixture.images.entries()) {
      const image = await RawImage.read(file);
      const inputs = await processor(image, '<image>', { add_special_tokens: false });
      assert.deepEqual(inputs.input_ids.dims, [1, fixture.prefix_length]);
      // 1. The whole public path: transformers.js' own resize and normalisation, its generate.
      const out = await model.generate({ ...inputs, do_sample: false });
      seen.greedy.push(newTokens(out, fixture.prefix_length, fixture.eos));
      // 2. The model alone on Python's pixel values (resizing differences taken out).
      const pixels = new Tensor('float32', python.slice(i * pixelSize, (i + 1) * pixelSize), [1, 3, height, width]);
      const exact = { ...inputs, pixel_values: pixels };
      seen.pixels.push(newTokens(await model.generate({ ...exact, do_sample: false }), fixture.prefix_length, fixture.eos));
      const norepeat = await model.generate({ ...exact, do_sample: false, no_repeat_ngram_size: 1 });
      seen.norepeat.push(newTokens(norepeat, fixture.prefix_length, fixture.eos));
      // 3. Beam search: transformers.js' forward and cache, decoding.js' search (see transformers_js_beam.js).
      seen.beam.push(await beamSearchCaption(model, exact, { numBeams: 3, noRepeatNgramSize: 1 }));
      // 4. transformers.js' own generate with num_beams: the greedy tokens (it does not search beams).
      const beams = await model.generate({ ...exact, do_sample: false, num_beams: 3, no_repeat_ngram_size: 1 });
      seen.generateBeams.push(newTokens(beams, fixture.prefix_length, fixture.eos));
    }
    await model.dispose();
    assert.deepEqual(seen.pixels, variant.greedy, 'greedy on Python pixels');
    assert.deepEqual(seen.greedy, variant.greedy, 'greedy through the processor');
    assert.deepEqual(seen.norepeat, variant.greedy_norepeat, 'greedy, no_repeat_ngram_size 1');
    assert.deepEqual(seen.beam, variant.beam3_norepeat, 'beam search (3 beams, no_repeat_ngram_size 1)');
    assert.deepEqual(seen.generateBeams, variant.greedy_norepeat, 'generate({num_beams: 3}) is greedy in this transformers.js');
  });
}
