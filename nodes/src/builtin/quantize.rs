//! ComfyUI's ImageQuantize: Pillow 13's median-cut palette (`libImaging/Quant.c`), its palette mapping
//! with the colour cache (`Palette.c`) and Floyd-Steinberg (`Convert.c`, `topalette`), and ComfyUI's own
//! ordered (Bayer) dither, ported line by line.

use std::collections::HashMap;

use diffloom_core::value::Shared;
use diffloom_core::{Args, Combo, Ctx, Int, Node, NodeError, Schema, Value, ValueType};
use tch::{Kind, Tensor};

const DITHERS: &[&str] = &["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"];

/// Quant.c's MAX_HASH_ENTRIES: past this many distinct colours the hash drops a low bit of each channel.
const MAX_HASH_ENTRIES: usize = 65536;

/// Quant.c's PIXEL_HASH (32-bit wrapping arithmetic); colours whose hashes agree count as one.
fn pixel_hash(r: u32, g: u32, b: u32) -> u32 {
    r.wrapping_mul(463) ^ (g << 8).wrapping_mul(10069) ^ (b << 16).wrapping_mul(64997)
}

fn scaled_hash(p: [u8; 3], scale: u32) -> u32 {
    pixel_hash(u32::from(p[0]) >> scale, u32::from(p[1]) >> scale, u32::from(p[2]) >> scale)
}

/// The colour statistics of `create_pixel_hash`: distinct colours (by hash at the final scale) with a
/// representative and a count, and the scale.
struct Histogram {
    scale: u32,
    index: HashMap<u32, usize>,
    entries: Vec<([u8; 3], u32)>,
}

fn histogram(pixels: &[[u8; 3]]) -> Histogram {
    let mut h = Histogram { scale: 0, index: HashMap::new(), entries: Vec::new() };
    for &p in pixels {
        let key = scaled_hash(p, h.scale);
        if let Some(&i) = h.index.get(&key) {
            h.entries[i].1 += 1;
            continue;
        }
        h.index.insert(key, h.entries.len());
        h.entries.push((p, 1));
        while h.entries.len() > MAX_HASH_ENTRIES {
            // hashtable_rehash_compute: regroup by the coarser hash, counts added up.
            h.scale += 1;
            let old = std::mem::take(&mut h.entries);
            h.index.clear();
            for (q, n) in old {
                let key = scaled_hash(q, h.scale);
                match h.index.get(&key) {
                    Some(&i) => h.entries[i].1 += n,
                    None => {
                        h.index.insert(key, h.entries.len());
                        h.entries.push((q, n));
                    }
                }
            }
        }
    }
    h
}

/// A median-cut box: its colours (indices into the scaled colour list), pixel count and children.
struct BoxNode {
    colours: Vec<usize>,
    pixel_count: u32,
    children: Option<(usize, usize)>,
}

/// QuantHeap.c: a binary max-heap on pixelCount (1-based), ties resolved as its sift loops do.
struct Heap {
    heap: Vec<usize>,
}

impl Heap {
    fn cmp(nodes: &[BoxNode], a: usize, b: usize) -> i64 {
        i64::from(nodes[a].pixel_count as i32) - i64::from(nodes[b].pixel_count as i32)
    }
    fn add(&mut self, nodes: &[BoxNode], val: usize) {
        self.heap.push(val);
        let mut k = self.heap.len() - 1;
        while k != 1 {
            if Self::cmp(nodes, val, self.heap[k / 2]) <= 0 {
                break;
            }
            self.heap[k] = self.heap[k / 2];
            k >>= 1;
        }
        self.heap[k] = val;
    }
    fn remove(&mut self, nodes: &[BoxNode]) -> Option<usize> {
        let count = self.heap.len() - 1;
        if count == 0 {
            return None;
        }
        let r = self.heap[1];
        let v = self.heap[count];
        self.heap.pop();
        let count = count - 1;
        let mut k = 1;
        while k * 2 <= count {
            let mut l = k * 2;
            if l < count && Self::cmp(nodes, self.heap[l], self.heap[l + 1]) < 0 {
                l += 1;
            }
            if Self::cmp(nodes, v, self.heap[l]) > 0 {
                break;
            }
            self.heap[k] = self.heap[l];
            k = l;
        }
        if k <= count {
            self.heap[k] = v;
        }
        Some(r)
    }
}

fn axis_range(colours: &[[u8; 3]], members: &[usize], axis: usize) -> (i32, i32) {
    let vals = members.iter().map(|&i| i32::from(colours[i][axis]));
    (vals.clone().max().unwrap_or(0), vals.min().unwrap_or(0))
}

fn box_volume(colours: &[[u8; 3]], node: &BoxNode) -> i32 {
    if node.colours.is_empty() {
        return 0;
    }
    (0..3).map(|a| axis_range(colours, &node.colours, a)).map(|(h, l)| h - l + 1).product()
}

/// Quant.c's `split`/`splitlists`: the axis of the largest luminance-weighted range, cut where the
/// running pixel count (colours in descending order) passes half, colours equal to the cut value kept left.
fn split(colours: &[[u8; 3]], counts: &[u32], node: &BoxNode) -> (Vec<usize>, Vec<usize>, u32, u32) {
    let weights = [77, 150, 29];
    let mut axis = 0;
    let mut best = 0;
    for (a, w) in weights.iter().enumerate() {
        let (h, l) = axis_range(colours, &node.colours, a);
        let f = (h - l) * w;
        if a == 0 || best < f {
            best = f;
            axis = a;
        }
    }
    let mut sorted = node.colours.clone();
    sorted.sort_by(|&a, &b| colours[b][axis].cmp(&colours[a][axis]));
    let mut flag = vec![false; sorted.len()];
    let (mut n0, mut n1, mut right) = (0u32, 0u32, 0usize);
    let mut left = 0u32;
    let mut c = 0;
    while c < sorted.len() {
        left = left.wrapping_add(counts[sorted[c]]);
        n0 = n0.wrapping_add(counts[sorted[c]]);
        c += 1;
        if left.wrapping_mul(2) > node.pixel_count {
            break;
        }
    }
    if c < sorted.len() {
        let split_val = colours[sorted[c - 1]][axis];
        while c < sorted.len() && colours[sorted[c]][axis] == split_val {
            n0 = n0.wrapping_add(counts[sorted[c]]);
            c += 1;
        }
    }
    while c < sorted.len() {
        flag[c] = true;
        right += 1;
        n1 = n1.wrapping_add(counts[sorted[c]]);
        c += 1;
    }
    if right == 0 {
        let tail_val = colours[sorted[sorted.len() - 1]][axis];
        for k in (0..sorted.len()).rev() {
            if colours[sorted[k]][axis] != tail_val {
                break;
            }
            flag[k] = true;
            n0 = n0.wrapping_sub(counts[sorted[k]]);
            n1 = n1.wrapping_add(counts[sorted[k]]);
        }
    }
    let (mut l, mut r) = (Vec::new(), Vec::new());
    for (k, &i) in sorted.iter().enumerate() {
        if flag[k] {
            r.push(i)
        } else {
            l.push(i)
        }
    }
    (l, r, n0, n1)
}

/// Pillow's `im.quantize(colors)` palette (median cut, no k-means) for 8-bit RGB pixels: the rounded
/// mean colour of each median-cut box, boxes numbered left to right.
pub fn median_cut_palette(pixels: &[[u8; 3]], colors: usize) -> Vec<[u8; 3]> {
    let hist = histogram(pixels);
    let scale = hist.scale;
    let colours: Vec<[u8; 3]> = hist.entries.iter().map(|(p, _)| [p[0] >> scale, p[1] >> scale, p[2] >> scale]).collect();
    let counts: Vec<u32> = hist.entries.iter().map(|e| e.1).collect();
    let mut nodes = vec![BoxNode { colours: (0..colours.len()).collect(), pixel_count: pixels.len() as u32, children: None }];
    let mut heap = Heap { heap: vec![usize::MAX] };
    heap.add(&nodes, 0);
    'cut: for _ in 1..colors.max(1) {
        let this = loop {
            let Some(n) = heap.remove(&nodes) else { break 'cut };
            if box_volume(&colours, &nodes[n]) != 1 {
                break n;
            }
        };
        let (l, r, n0, n1) = split(&colours, &counts, &nodes[this]);
        let (li, ri) = (nodes.len(), nodes.len() + 1);
        nodes.push(BoxNode { colours: l, pixel_count: n0, children: None });
        nodes.push(BoxNode { colours: r, pixel_count: n1, children: None });
        nodes[this].children = Some((li, ri));
        heap.add(&nodes, li);
        heap.add(&nodes, ri);
    }
    // annotate_hash_table: leaves left to right, empty ones skipped.
    let mut entry_of = vec![0u32; colours.len()];
    let mut n_entries = 0u32;
    let mut stack = vec![0usize];
    while let Some(n) = stack.pop() {
        match nodes[n].children {
            Some((l, r)) => {
                stack.push(r);
                stack.push(l);
            }
            None => {
                for &c in &nodes[n].colours {
                    entry_of[c] = n_entries;
                }
                if !nodes[n].colours.is_empty() {
                    n_entries += 1;
                }
            }
        }
    }
    // compute_palette_from_median_cut: 32-bit sums of the original pixels, (int)(.5 + sum / count).
    let mut sums = vec![[0u32; 3]; n_entries as usize];
    let mut count = vec![0u32; n_entries as usize];
    for p in pixels {
        let e = entry_of[hist.index[&scaled_hash(*p, scale)]] as usize; // invariant: the histogram holds every pixel's class
        for ch in 0..3 {
            sums[e][ch] = sums[e][ch].wrapping_add(u32::from(p[ch]));
        }
        count[e] = count[e].wrapping_add(1);
    }
    sums.iter().zip(&count).map(|(s, &n)| s.map(|v| (0.5 + f64::from(v) / f64::from(n)) as i32 as u8)).collect()
}

/// Palette.c's colour cache: the palette entry for (r, g, b) as `ImagingPaletteCacheUpdate` fills its
/// 4×4×4 cells (distances from each cell's low corner, Heckbert's box pruning).
struct PaletteCache<'a> {
    palette: &'a [[u8; 3]],
    cache: Vec<i16>,
}

impl<'a> PaletteCache<'a> {
    fn new(palette: &'a [[u8; 3]]) -> Self {
        PaletteCache { palette, cache: vec![0x100; 64 * 64 * 64] }
    }
    fn slot(r: i32, g: i32, b: i32) -> usize {
        ((r >> 2) + (g >> 2) * 64 + (b >> 2) * 64 * 64) as usize
    }
    fn get(&mut self, r: i32, g: i32, b: i32) -> usize {
        if self.cache[Self::slot(r, g, b)] == 0x100 {
            self.update(r, g, b);
        }
        self.cache[Self::slot(r, g, b)] as usize
    }
    fn update(&mut self, r: i32, g: i32, b: i32) {
        const BOX: i32 = 8;
        const STEP: i32 = 4;
        let dist = |a: i32, b: i32| ((a - b) * (a - b)) as u32;
        let (r0, g0, b0) = (r & 0xe0, g & 0xe0, b & 0xe0);
        let (r1, g1, b1) = (r0 + 0x1f, g0 + 0x1f, b0 + 0x1f);
        let (rc, gc, bc) = ((r0 + r1) / 2, (g0 + g1) / 2, (b0 + b1) / 2);
        let mut dmin = vec![0u32; self.palette.len()];
        let mut dmax = u32::MAX;
        for (i, p) in self.palette.iter().enumerate() {
            let (pr, pg, pb) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
            let near = |v: i32, lo: i32, hi: i32| {
                if v < lo {
                    dist(v, lo)
                } else if v > hi {
                    dist(v, hi)
                } else {
                    0
                }
            };
            let far = |v: i32, lo: i32, hi: i32, c: i32| if v <= c { dist(v, hi) } else { dist(v, lo) };
            let tmin = near(pr, r0, r1).wrapping_add(near(pg, g0, g1)).wrapping_add(near(pb, b0, b1));
            let tmax = far(pr, r0, r1, rc).wrapping_add(far(pg, g0, g1, gc)).wrapping_add(far(pb, b0, b1, bc));
            dmin[i] = tmin;
            dmax = dmax.min(tmax);
        }
        let mut d = [u32::MAX; (BOX * BOX * BOX) as usize];
        let mut c = [0u8; (BOX * BOX * BOX) as usize];
        for (i, p) in self.palette.iter().enumerate() {
            if dmin[i] > dmax {
                continue;
            }
            let ri = r0 - i32::from(p[0]);
            let gi = g0 - i32::from(p[1]);
            let bi = b0 - i32::from(p[2]);
            let mut rd = ri * ri + gi * gi + bi * bi;
            let mut rx = ri * (2 * STEP) + STEP * STEP;
            let gi = gi * (2 * STEP) + STEP * STEP;
            let bi = bi * (2 * STEP) + STEP * STEP;
            let mut j = 0;
            for _ in 0..BOX {
                let mut gd = rd;
                let mut gx = gi;
                for _ in 0..BOX {
                    let mut bd = gd;
                    let mut bx = bi;
                    for _ in 0..BOX {
                        if (bd as u32) < d[j] {
                            d[j] = bd as u32;
                            c[j] = i as u8;
                        }
                        bd += bx;
                        bx += 2 * STEP * STEP;
                        j += 1;
                    }
                    gd += gx;
                    gx += 2 * STEP * STEP;
                }
                rd += rx;
                rx += 2 * STEP * STEP;
            }
        }
        let mut j = 0;
        for rr in (r0..r1).step_by(4) {
            for gg in (g0..g1).step_by(4) {
                for bb in (b0..b1).step_by(4) {
                    self.cache[Self::slot(rr, gg, bb)] = i16::from(c[j]);
                    j += 1;
                }
            }
        }
    }
}

/// Convert.c's `topalette`: each pixel's palette index, nearest through the cache, or with Pillow's
/// Floyd-Steinberg error propagation (its integer arithmetic and row-end carry as written).
pub fn to_palette(pixels: &[[u8; 3]], w: usize, h: usize, palette: &[[u8; 3]], dither: bool) -> Vec<u8> {
    let mut cache = PaletteCache::new(palette);
    let mut out = vec![0u8; pixels.len()];
    if !dither {
        for (o, p) in out.iter_mut().zip(pixels) {
            *o = cache.get(i32::from(p[0]), i32::from(p[1]), i32::from(p[2])) as u8;
        }
        return out;
    }
    let clip8 = |v: i32| v.clamp(0, 255);
    let mut errors = vec![0i32; (w + 1) * 3];
    for y in 0..h {
        let (mut r, mut r0, mut r1) = (0i32, 0i32, 0i32);
        let (mut g, mut g0, mut g1) = (0i32, 0i32, 0i32);
        let (mut b, mut b0, mut b1, mut b2) = (0i32, 0i32, 0i32, 0i32);
        let mut e = 0usize;
        for x in 0..w {
            let p = pixels[y * w + x];
            // C's `/` truncates toward zero, as Rust's does.
            r = clip8(i32::from(p[0]) + (r + errors[e + 3]) / 16);
            g = clip8(i32::from(p[1]) + (g + errors[e + 4]) / 16);
            b = clip8(i32::from(p[2]) + (b + errors[e + 5]) / 16);
            let idx = cache.get(r, g, b);
            out[y * w + x] = idx as u8;
            r -= i32::from(palette[idx][0]);
            g -= i32::from(palette[idx][1]);
            b -= i32::from(palette[idx][2]);
            let r2 = r;
            let d2 = r + r;
            r += d2;
            errors[e] = r + r0;
            r += d2;
            r0 = r + r1;
            r1 = r2;
            r += d2;
            let g2 = g;
            let d2 = g + g;
            g += d2;
            errors[e + 1] = g + g0;
            g += d2;
            g0 = g + g1;
            g1 = g2;
            g += d2;
            b2 = b;
            let d2 = b + b;
            b += d2;
            errors[e + 2] = b + b0;
            b += d2;
            b0 = b + b1;
            b1 = b2;
            b += d2;
            e += 3;
        }
        errors[e] = b0;
        errors[e + 1] = b1;
        errors[e + 2] = b2;
    }
    out
}

/// ComfyUI's `normalized_bayer_matrix(n)` in float32, then `spread * M + 0.5` (float32).
fn bayer_thresholds(order: usize, num_colors: usize) -> Vec<f32> {
    let mut m = vec![0f32];
    let mut size = 1;
    let levels = order.trailing_zeros();
    for n in 1..=levels {
        let q = 4f32.powi(n as i32);
        let scaled: Vec<f32> = m.iter().map(|v| q * v).collect();
        let mut next = vec![0f32; 4 * size * size];
        for y in 0..size {
            for x in 0..size {
                let v = scaled[y * size + x];
                next[y * 2 * size + x] = (v - 1.5) / q;
                next[y * 2 * size + x + size] = (v + 0.5) / q;
                next[(y + size) * 2 * size + x] = (v + 1.5) / q;
                next[(y + size) * 2 * size + x + size] = (v - 0.5) / q;
            }
        }
        m = next;
        size *= 2;
    }
    let spread = (2.0 * 256.0 / num_colors as f64) as f32;
    m.iter().map(|v| spread * v + 0.5).collect()
}

pub struct ImageQuantize;
impl Node for ImageQuantize {
    fn schema(&self) -> Schema {
        Schema::new("ImageQuantize", "image/postprocessing")
            .describe("Reduces each image to at most `colors` colours with Pillow's median cut, as ComfyUI; dithering none, Floyd-Steinberg (Pillow's) or ordered (Bayer).")
            .input("image", ValueType::Image)
            .input("colors", Int::new(256).range(1, 256))
            .input("dither", Combo::of(DITHERS))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = &a.image("image")?.0;
        let size = image.size();
        let [n, h, w, c] = size[..] else { return Err(NodeError::input("image", format!("expected [B, H, W, C], got {size:?}"))) };
        if c != 3 {
            return Err(NodeError::input("image", format!("{c} channels: ComfyUI's ImageQuantize takes RGB images")));
        }
        let colors = usize::try_from(a.i64("colors")?).ok().filter(|c| (1..=256).contains(c));
        let Some(colors) = colors else { return Err(NodeError::input("colors", "must be 1 to 256")) };
        let dither = a.string("dither")?;
        if !DITHERS.contains(&dither) {
            return Err(NodeError::input("dither", format!("{dither:?} is not one of {DITHERS:?}")));
        }
        let (h, w) = (h as usize, w as usize);
        // ComfyUI: (image[b] * 255).to(torch.uint8), no clamp: libtorch's own conversion.
        let bytes = image.f_to_kind(Kind::Float)?.f_mul_scalar(255.0)?.f_to_kind(Kind::Uint8)?.f_contiguous()?.f_view([-1])?;
        let bytes = Vec::<u8>::try_from(&bytes)?;
        let mut out = Vec::with_capacity(bytes.len());
        for b in 0..n as usize {
            cx.check_cancel()?;
            let pixels: Vec<[u8; 3]> = bytes[b * h * w * 3..(b + 1) * h * w * 3].chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
            let palette = median_cut_palette(&pixels, colors);
            let indices = match dither {
                "none" => to_palette(&pixels, w, h, &palette, false),
                "floyd-steinberg" => to_palette(&pixels, w, h, &palette, true),
                _ => {
                    let order: usize = dither.trim_start_matches("bayer-").parse().map_err(|_| NodeError::input("dither", format!("{dither:?}")))?;
                    let t = bayer_thresholds(order, palette.len());
                    let dithered: Vec<[u8; 3]> = pixels
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let off = t[(i / w) % order * order + (i % w) % order];
                            p.map(|v| (f32::from(v) + off).clamp(0.0, 255.0) as u8)
                        })
                        .collect();
                    to_palette(&dithered, w, h, &palette, false)
                }
            };
            out.extend(indices.iter().flat_map(|&i| palette[i as usize]).map(|v| f32::from(v) / 255.0));
        }
        let t = Tensor::f_from_slice(&out)?.f_view([n, h as i64, w as i64, 3])?;
        Ok(vec![Value::Image(Shared(t))])
    }
}
