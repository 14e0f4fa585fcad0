/**
 * Token choice for caption generation: greedy, multinomial sampling and beam search with
 * the semantics of transformers' `generate`, ported from vlmexport/runtime/generate.py (which
 * is itself ported from transformers) so that, on the same logits, JS and Python choose the same
 * tokens. Scores are kept in float32 (Math.fround after each operation), as numpy keeps them.
 *
 * The model is reached through two callbacks, so this file has no ONNX Runtime in it:
 *   firstPass() → {logits: Float32Array (vocab, last position), state}
 *   step(tokens: number[], state, rows?: number[]) → {logits: Float32Array[rows * vocab], state}
 * where `rows` (beam search) says which cached row each new token continues.
 */

// transformers masks beams with this finite constant, not -inf; float32 arithmetic around it
// decides ties, so it is kept exactly (it is exactly representable in float32).
export const NEG = -1.0e9;

const f32 = Math.fround;

/** Decoding options with transformers' meanings; throws one Error listing every bad value. */
export function decodeOptions({
  maxLength,
  numBeams = 1,
  doSample = false,
  temperature = 1.0,
  topK = 0,
  topP = 1.0,
  seed = null,
  lengthPenalty = 1.0,
  earlyStopping = false,
  noRepeatNgramSize = 0,
} = {}) {
  const problems = [];
  if (!Number.isInteger(maxLength) || maxLength < 1) problems.push(`maxLength must be an integer ≥ 1 (got ${maxLength})`);
  if (!Number.isInteger(numBeams) || numBeams < 1) problems.push(`numBeams must be an integer ≥ 1 (got ${numBeams})`);
  if (!(temperature > 0)) problems.push(`temperature must be > 0 (got ${temperature})`);
  if (!Number.isInteger(topK) || topK < 0) problems.push(`topK must be an integer ≥ 0 (got ${topK}; 0 turns it off)`);
  if (!(topP > 0 && topP <= 1)) problems.push(`topP must be in (0, 1] (got ${topP})`);
  if (!Number.isFinite(lengthPenalty)) problems.push(`lengthPenalty must be finite (got ${lengthPenalty})`);
  if (![true, false, 'never'].includes(earlyStopping)) problems.push(`earlyStopping must be true, false or "never" (got ${earlyStopping})`);
  if (!Number.isInteger(noRepeatNgramSize) || noRepeatNgramSize < 0) problems.push(`noRepeatNgramSize must be an integer ≥ 0 (got ${noRepeatNgramSize})`);
  if (problems.length) throw new Error(`bad decoding options: ${problems.join('; ')}`);
  return { maxLength, numBeams, doSample, temperature, topK, topP, seed, lengthPenalty, earlyStopping, noRepeatNgramSize };
}

/**
 * A seeded uniform generator in [0, 1) (mulberry32); an unseeded one draws from Math.random.
 * JS and numpy draw different streams, so sampled tokens are reproducible per seed, not equal to Python's.
 */
export function makeRng(seed) {
  if (seed === null || seed === undefined) return { random: Math.random };
  let a = seed >>> 0;
  return {
    random() {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    },
  };
}

/** Index of the largest score; the first one on ties (numpy's argmax). */
export function argmax(scores) {
  let best = 0;
  for (let i = 1; i < scores.length; i++) if (scores[i] > scores[best]) best = i;
  return best;
}

/** Indices of the k largest scores, largest first, lower index first on ties (a stable sort, without sorting all). */
export function topk(scores, k) {
  const picked = [];
  for (let i = 0; i < scores.length; i++) {
    const s = scores[i];
    if (picked.length === k && !(s > scores[picked[k - 1]])) continue;
    let at = picked.length === k ? k - 1 : picked.length;
    while (at > 0 && s > scores[picked[at - 1]]) at--;
    picked.splice(at, 0, i);
    if (picked.length > k) picked.pop();
  }
  return picked;
}

export function logSoftmax(scores) {
  let max = -Infinity;
  for (const s of scores) if (s > max) max = s;
  let sum = 0;
  for (const s of scores) sum += Math.exp(f32(s - max));
  const logSum = Math.log(sum);
  return scores.map((s) => f32(f32(s - max) - logSum));
}

export function softmax(scores) {
  let max = -Infinity;
  for (const s of scores) if (s > max) max = s;
  const exp = scores.map((s) => Math.exp(f32(s - max)));
  let sum = 0;
  for (const e of exp) sum += e;
  return exp.map((e) => f32(e / sum));
}

/** Ban every token that would complete an n-gram already in `ids` (NoRepeatNGramLogitsProcessor). */
export function noRepeatNgram(ids, scores, size) {
  const length = ids.length;
  if (length < size) return scores;
  const out = Float32Array.from(scores);
  const suffix = ids.slice(length + 1 - size);
  for (let i = 0; i + size - 1 < length; i++) {
    let match = true;
    for (let j = 0; j < size - 1 && match; j++) match = ids[i + j] === suffix[j];
    if (match && ids[i + size - 1] < out.length) out[ids[i + size - 1]] = -Infinity;
  }
  return out;
}

/** Keep scores ≥ the k-th largest (ties kept, as TopKLogitsWarper). */
export function topKFilter(scores, k) {
  k = Math.min(k, scores.length);
  const threshold = scores[topk(scores, k)[k - 1]];
  return scores.map((s) => (s < threshold ? -Infinity : s));
}

/** Drop the least likely tokens whose cumulative probability is ≤ 1 - topP (TopPLogitsWarper). */
export function topPFilter(scores, topP, minTokensToKeep) {
  const order = Array.from(scores.keys()).sort((a, b) => scores[a] - scores[b] || a - b);
  const probs = softmax(Float32Array.from(order, (i) => scores[i]));
  const limit = f32(1 - topP);
  const out = Float32Array.from(scores);
  let cumulative = 0;
  for (let r = 0; r < order.length - minTokensToKeep; r++) {
    cumulative = f32(cumulative + probs[r]);
    if (cumulative <= limit) out[order[r]] = -Infinity;
  }
  return out;
}

/** transformers' logits processors for these options, in its order; temperature, top-k, top-p only when sampling. */
export function logitsProcessors(options, minTokensToKeep) {
  const processors = [];
  if (options.noRepeatNgramSize > 0) processors.push((ids, s) => noRepeatNgram(ids, s, options.noRepeatNgramSize));
  if (options.doSample) {
    if (options.temperature !== 1.0) processors.push((ids, s) => s.map((v) => f32(v / f32(options.temperature))));
    if (options.topK) processors.push((ids, s) => topKFilter(s, Math.max(options.topK, minTokensToKeep)));
    if (options.topP < 1.0) processors.push((ids, s) => topPFilter(s, options.topP, minTokensToKeep));
  }
  return processors;
}

function apply(processors, ids, scores) {
  for (const processor of processors) scores = processor(ids, scores);
  return scores;
}

/** One token from probabilities, by inverse CDF on one uniform draw. */
export function draw(probs, rng) {
  let total = 0;
  for (const p of probs) total += p;
  const target = rng.random() * total;
  let cumulative = 0;
  for (let i = 0; i < probs.length; i++) {
    cumulative += probs[i];
    if (cumulative > target) return i;
  }
  return probs.length - 1;
}

function stripAfterEos(tokens, eos) {
  const at = tokens.indexOf(eos);
  return at >= 0 ? tokens.slice(0, at) : tokens;
}

/** Greedy or multinomial sampling for one image (transformers' `_sample`); EOS excluded. */
export async function sample(model, options, eos, rng) {
  const processors = logitsProcessors(options, 1);
  const ids = [];
  let { logits, state } = await model.firstPass();
  for (let step = 0; step < options.maxLength; step++) {
    const scores = apply(processors, ids, Float32Array.from(logits));
    const chosen = options.doSample ? draw(softmax(scores), rng) : argmax(scores);
    ids.push(chosen);
    if (chosen === eos || step === options.maxLength - 1) break;
    ({ logits, state } = await model.step([chosen], state));
  }
  return stripAfterEos(ids, eos);
}

/**
 * transformers' `_beam_search` (and beam sampling with doSample) for one image, prompt length 0,
 * step by step as vlmexport/runtime/generate.py's `beam_search` (its letters c-g name the steps).
 */
export async function beamSearch(model, options, eos, rng) {
  const beams = options.numBeams;
  const length = options.maxLength;
  const keep = 2 * beams;
  const processors = logitsProcessors(options, 2);
  let running = Array.from({ length: beams }, () => []);
  let runningScores = Float32Array.from({ length: beams }, (_, b) => (b === 0 ? 0 : NEG));
  let finished = Array.from({ length: beams }, () => []);
  let finishedScores = new Float32Array(beams).fill(NEG);
  let isFinished = new Array(beams).fill(false);
  let improvable = true;
  // The prefix pass is the same for every beam: run it once, every beam reads the same row.
  const first = await model.firstPass();
  let rowLogits = Array.from({ length: beams }, () => first.logits);
  let state = first.state;
  let rows = new Array(beams).fill(0);
  for (let cur = 0; cur < length; cur++) {
    if (cur) {
      // After the first pass the cache has one row, which every beam continues.
      const cached = cur === 1 ? rows.map(() => 0) : rows;
      const out = await model.step(running.map((tokens) => tokens[cur - 1]), state, cached);
      state = out.state;
      const vocab = out.logits.length / beams;
      rowLogits = running.map((_, b) => out.logits.subarray(b * vocab, (b + 1) * vocab));
    }
    const vocab = rowLogits[0].length;
    const totals = new Float32Array(beams * vocab);
    for (let b = 0; b < beams; b++) {
      const logProbs = apply(processors, running[b], logSoftmax(Float32Array.from(rowLogits[b])));
      for (let v = 0; v < vocab; v++) totals[b * vocab + v] = f32(logProbs[v] + runningScores[b]);
    }
    // c. top `keep` continuations over all beams (sampled without replacement when doSample)
    const picked = topContinuations(totals, keep, options.doSample, rng);
    const topScores = picked.map((i) => totals[i]);
    const source = picked.map((i) => Math.floor(i / vocab));
    const candidates = picked.map((i, j) => [...running[source[j]], i % vocab]);
    // d. which continuations end here
    const ends = picked.map((i) => i % vocab === eos || cur + 1 >= length);
    // e. the best `beams` continuations that go on
    const alive = Float32Array.from(topScores, (s, j) => (ends[j] ? f32(s + NEG) : s));
    const order = topk(alive, beams);
    running = order.map((j) => candidates[j]);
    runningScores = Float32Array.from(order, (j) => alive[j]);
    rows = order.map((j) => source[j]);
    // f. merge the new finished hypotheses into the kept ones
    const full = isFinished.every(Boolean) && options.earlyStopping === true;
    const divisor = f32((cur + 1) ** options.lengthPenalty);
    const scores = Float32Array.from(topScores, (s, j) => {
      let score = f32(s / divisor);
      if (full) score = f32(score + NEG);
      if (!improvable) score = f32(score + NEG);
      if (!(ends[j] && j < beams)) score = f32(score + NEG);
      return score;
    });
    const pool = [...finishedScores, ...scores];
    const merged = topk(pool, beams);
    const poolTokens = [...finished, ...candidates];
    const poolFinished = [...isFinished, ...ends.map((e, j) => e && j < beams)];
    finished = merged.map((m) => poolTokens[m]);
    finishedScores = Float32Array.from(merged, (m) => pool[m]);
    isFinished = merged.map((m) => poolFinished[m]);
    // g. stop when no running beam can beat the worst finished one, or nothing can go on
    improvable = improvable && canImprove(runningScores, finishedScores, isFinished, cur + 1, length, options);
    const allFull = isFinished.every(Boolean) && options.earlyStopping === true;
    if (!improvable || allFull || ends.every(Boolean)) break;
  }
  return stripAfterEos(finished[0], eos);
}

function topContinuations(totals, keep, doSample, rng) {
  if (!doSample) return topk(totals, keep);
  // Gumbel-top-k draws `keep` items without replacement with softmax(totals) probabilities,
  // then they are ordered by score as transformers orders them.
  const perturbed = totals.map((t) => {
    const u = Math.max(rng.random(), Number.MIN_VALUE);
    return f32(t + f32(-Math.log(-Math.log(u))));
  });
  const picked = topk(perturbed, keep);
  return topk(picked.map((i) => totals[i]), keep).map((j) => picked[j]);
}

/** transformers' `_check_early_stop_heuristic`: could the best running beam still beat the worst finished one? */
function canImprove(runningScores, finishedScores, isFinished, curLen, maxLength, options) {
  const penalty = options.lengthPenalty;
  const hypothetical = options.earlyStopping === 'never' && penalty > 0 ? maxLength : curLen;
  const bestRunning = f32(runningScores[0] / f32(hypothetical ** penalty));
  const worst = Math.min(...finishedScores);
  return isFinished.some((done) => bestRunning > (done ? worst : NEG));
}
