/**
 * Image preprocessing for a vlmexport bundle, from its preprocessor_config.json.
 *
 * The Python side (vlmexport/bundle/preprocess.py) resizes with PIL and then rescales and
 * normalises in float32. The resize here is a port of Pillow's own resampling (libImaging
 * Resample.c and, for NEAREST, Geometry.c's scale-affine path): the same filter supports, the
 * same 22-bit fixed-point coefficients, the same two passes in the same order, rounded to
 * 8 bits in between, so the same RGB pixels give bit-identical pixel values in Python, Node and
 * the browser. A canvas resize would not: browsers pick their own filters, and one flipped
 * pixel can flip a greedy token of a small model.
 *
 * Works in Node and in browsers; only `imageToRGBA` needs a browser (canvas, createImageBitmap).
 */

// Pillow's resample ids, as stored in preprocessor_config.json's `resample`.
export const RESAMPLE = Object.freeze({ NEAREST: 0, LANCZOS: 1, BILINEAR: 2, BICUBIC: 3, BOX: 4, HAMMING: 5 });

const PRECISION_BITS = 32 - 8 - 2;

function sinc(x) {
  if (x === 0) return 1;
  const px = x * Math.PI;
  return Math.sin(px) / px;
}

// Filter functions and supports exactly as Resample.c defines them (hamming uses float constants).
const FILTERS = {
  [RESAMPLE.BOX]: { support: 0.5, weight: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
  [RESAMPLE.BILINEAR]: {
    support: 1,
    weight: (x) => {
      x = Math.abs(x);
      return x < 1 ? 1 - x : 0;
    },
  },
  [RESAMPLE.HAMMING]: {
    support: 1,
    weight: (x) => {
      x = Math.abs(x);
      if (x === 0) return 1;
      if (x >= 1) return 0;
      const px = x * Math.PI;
      return (Math.sin(px) / px) * (Math.fround(0.54) + Math.fround(0.46) * Math.cos(px));
    },
  },
  [RESAMPLE.BICUBIC]: {
    support: 2,
    weight: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
  [RESAMPLE.LANCZOS]: { support: 3, weight: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0) },
};

/** Per output pixel: first input index, tap count, and fixed-point weights (Pillow's precompute_coeffs). */
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const weights = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    // C casts truncate toward zero; Math.trunc does the same.
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      weights[x] = filter.weight((x + xmin - center + 0.5) * ss);
      ww += weights[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? weights[x] / ww : weights[x];
      kk[xx * ksize + x] = Math.trunc(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(ss) {
  const v = ss >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** One resampling pass along x (horizontal) or y, on interleaved RGB uint8 pixels. */
function resamplePass(src, width, height, outSize, filter, horizontal) {
  const { ksize, bounds, kk } = coefficients(horizontal ? width : height, outSize, filter);
  const outW = horizontal ? outSize : width;
  const outH = horizontal ? height : outSize;
  const out = new Uint8Array(outW * outH * 3);
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const o = horizontal ? x : y;
      const start = bounds[o * 2];
      const taps = bounds[o * 2 + 1];
      let s0 = half;
      let s1 = half;
      let s2 = half;
      for (let t = 0; t < taps; t++) {
        const k = kk[o * ksize + t];
        const i = horizontal ? (y * width + start + t) * 3 : ((start + t) * width + x) * 3;
        s0 += src[i] * k;
        s1 += src[i + 1] * k;
        s2 += src[i + 2] * k;
      }
      const j = (y * outW + x) * 3;
      out[j] = clip8(s0);
      out[j + 1] = clip8(s1);
      out[j + 2] = clip8(s2);
    }
  }
  return out;
}

/** Pillow's NEAREST resize (ImagingScaleAffine): source positions stepped by accumulation, as in C. */
function resizeNearest(src, width, height, outW, outH) {
  const coord = (v) => (v < 0 ? -1 : Math.trunc(v));
  const xs = new Int32Array(outW);
  let xo = (width / outW) * 0.5;
  for (let x = 0; x < outW; x++, xo += width / outW) xs[x] = coord(xo);
  const out = new Uint8Array(outW * outH * 3);
  let yo = (height / outH) * 0.5;
  for (let y = 0; y < outH; y++, yo += height / outH) {
    const yi = coord(yo);
    for (let x = 0; x < outW; x++) {
      const i = (yi * width + xs[x]) * 3;
      const j = (y * outW + x) * 3;
      out[j] = src[i];
      out[j + 1] = src[i + 1];
      out[j + 2] = src[i + 2];
    }
  }
  return out;
}

/**
 * Resize interleaved RGB uint8 pixels as `PIL.Image.resize((outW, outH), resample)` does.
 * @param {Uint8Array|Uint8ClampedArray} rgb width*height*3 bytes
 * @returns {Uint8Array} outW*outH*3 bytes
 */
export function resizeRGB(rgb, width, height, outW, outH, resample = RESAMPLE.BICUBIC) {
  if (width === outW && height === outH) return Uint8Array.from(rgb);
  if (resample === RESAMPLE.NEAREST) return resizeNearest(rgb, width, height, outW, outH);
  const filter = FILTERS[resample];
  if (!filter) throw new Error(`unsupported resample ${resample}: use one of Pillow's 0-5`);
  // Pillow 13 (pinned in constraints.txt) runs the vertical pass first when the height shrinks
  // by more than twice as many pixels as the width; the order changes the 8-bit rounding between passes.
  const horizontalFirst = !(height - outH > 0 && height - outH > (width - outW) * 2);
  let pixels = rgb;
  if (horizontalFirst) {
    if (outW !== width) pixels = resamplePass(pixels, width, height, outW, filter, true);
    if (outH !== height) pixels = resamplePass(pixels, outW, height, outH, filter, false);
  } else {
    if (outH !== height) pixels = resamplePass(pixels, width, height, outH, filter, false);
    if (outW !== width) pixels = resamplePass(pixels, width, outH, outW, filter, true);
  }
  return pixels;
}

/**
 * RGBA (or RGB) pixels → RGB, transparency composited onto white as the Python side does.
 * @param {{data: ArrayLike<number>, width: number, height: number, channels?: number}} image
 */
export function toRGB({ data, width, height, channels = 4 }) {
  if (channels === 3) return Uint8Array.from(data);
  if (channels !== 4) throw new Error(`expected 3 or 4 channels, got ${channels}`);
  const rgb = new Uint8Array(width * height * 3);
  for (let p = 0; p < width * height; p++) {
    const a = data[p * 4 + 3];
    for (let c = 0; c < 3; c++) {
      const v = data[p * 4 + c];
      rgb[p * 3 + c] = a === 255 ? v : Math.round((v * a + 255 * (255 - a)) / 255);
    }
  }
  return rgb;
}

/**
 * The settings of a preprocessor_config.json, read the way vlmexport's Python `load_preprocessor`
 * reads them (size or, with do_center_crop, crop_size; int, {height,width} or {shortest_edge}).
 */
export function readPreprocessorConfig(config) {
  const chosen = config.do_center_crop ? config.crop_size : config.size;
  let height = 224;
  let width = 224;
  if (typeof chosen === 'number') height = width = chosen;
  else if (chosen && 'height' in chosen) ({ height, width } = chosen);
  else if (chosen && 'shortest_edge' in chosen) height = width = chosen.shortest_edge;
  return {
    height,
    width,
    resample: config.resample ?? RESAMPLE.BICUBIC,
    rescaleFactor: config.do_rescale === false ? 1 : (config.rescale_factor ?? 1 / 255),
    doNormalize: config.do_normalize !== false,
    mean: config.image_mean ?? [0.5, 0.5, 0.5],
    std: config.image_std ?? [0.5, 0.5, 0.5],
  };
}

/**
 * RGB pixels → pixel values [3, height, width] float32, channels first, computed in float32
 * step by step (Math.fround after every operation) exactly as numpy does it in Python.
 */
export function pixelValues(rgb, width, height, pre) {
  const resized = resizeRGB(rgb, width, height, pre.width, pre.height, pre.resample);
  const plane = pre.width * pre.height;
  const out = new Float32Array(3 * plane);
  const factor = Math.fround(pre.rescaleFactor);
  const mean = pre.mean.map(Math.fround);
  const std = pre.std.map(Math.fround);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      let v = Math.fround(resized[p * 3 + c] * factor);
      if (pre.doNormalize) v = Math.fround(Math.fround(v - mean[c]) / std[c]);
      out[c * plane + p] = v;
    }
  }
  return out;
}

/**
 * Decode a browser image source to RGBA pixels at its own size, with no colour management
 * and no premultiplied alpha (what PIL reads from the file).
 * @param {Blob|ImageBitmap|HTMLImageElement|HTMLCanvasElement|OffscreenCanvas|ImageData|string|URL} image
 * @returns {Promise<{data: Uint8ClampedArray, width: number, height: number, channels: 4}>}
 */
export async function imageToRGBA(image) {
  if (typeof ImageData !== 'undefined' && image instanceof ImageData) {
    return { data: image.data, width: image.width, height: image.height, channels: 4 };
  }
  if (typeof image === 'string' || image instanceof URL) {
    const response = await fetch(image);
    if (!response.ok) throw new Error(`cannot fetch image ${image}: HTTP ${response.status}`);
    image = await response.blob();
  }
  let source = image;
  if (typeof Blob !== 'undefined' && image instanceof Blob) {
    try {
      source = await createImageBitmap(image, { premultiplyAlpha: 'none', colorSpaceConversion: 'none' });
    } catch (error) {
      throw new Error(`not a readable image (${error.message}): pick a PNG, JPEG, WebP or GIF file`);
    }
  }
  const width = source.naturalWidth || source.width;
  const height = source.naturalHeight || source.height;
  const canvas = typeof OffscreenCanvas !== 'undefined' ? new OffscreenCanvas(width, height) : Object.assign(document.createElement('canvas'), { width, height });
  const context = canvas.getContext('2d', { willReadFrequently: true });
  context.drawImage(source, 0, 0);
  if (source.close) source.close();
  return { data: context.getImageData(0, 0, width, height).data, width, height, channels: 4 };
}
