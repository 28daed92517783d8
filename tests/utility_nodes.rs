//! ComfyUI's utility nodes (strings, image/latent/mask transforms, batches, compositing): values
//! computed by hand on small tensors, and a Python reference copying ComfyUI's node bodies where the
//! maths is not trivial (tests/parity/utility_reference.py).

use std::path::Path;

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Ctx, Folders, Locator, Node, Registry, Value};
use diffloom_nodes::builtin::{image, latent, mask, rebatch, strings};
use tch::{Device, Kind, Tensor};

use crate::util::{call, max_abs_diff, outputs, Dir};

fn img(t: &Tensor) -> Option<Value> {
    Some(Value::Image(Shared(t.shallow_clone())))
}
fn msk(t: &Tensor) -> Option<Value> {
    Some(Value::Mask(Shared(t.shallow_clone())))
}
fn lat(t: &Tensor, noise_mask: Option<&Tensor>, batch_index: Option<Vec<i64>>) -> Option<Value> {
    Some(Value::Latent(Latent { samples: Shared(t.shallow_clone()), noise_mask: noise_mask.map(|m| Shared(m.shallow_clone())), batch_index }))
}
fn s(x: &str) -> Option<Value> {
    Some(Value::String(x.into()))
}
fn i(x: i128) -> Option<Value> {
    Some(Value::Int(x))
}
fn f(x: f64) -> Option<Value> {
    Some(Value::Float(x))
}
fn b(x: bool) -> Option<Value> {
    Some(Value::Boolean(x))
}

fn run(node: &dyn Node, args: Vec<(&str, Option<Value>)>) -> Vec<Value> {
    call(node, args).unwrap_or_else(|e| panic!("{}: {e}", node.schema().name))
}
fn err(node: &dyn Node, args: Vec<(&str, Option<Value>)>) -> String {
    call(node, args).expect_err("an error").to_string()
}
fn tensor(v: &Value) -> Tensor {
    match v {
        Value::Image(t) | Value::Mask(t) => t.0.shallow_clone(),
        Value::Latent(l) => l.samples.0.shallow_clone(),
        other => panic!("{other:?}"),
    }
}
fn latent_of(v: &Value) -> Latent {
    match v {
        Value::Latent(l) => l.clone(),
        other => panic!("{other:?}"),
    }
}
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => panic!("{other:?}"),
    }
}
fn boolean(v: &Value) -> bool {
    match v {
        Value::Boolean(b) => *b,
        other => panic!("{other:?}"),
    }
}
fn int(v: &Value) -> i128 {
    match v {
        Value::Int(i) => *i,
        other => panic!("{other:?}"),
    }
}
/// 0, 1, 2, … in `shape`, as f32.
fn ramp(shape: &[i64]) -> Tensor {
    Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu)).reshape(shape)
}
fn vals(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap()
}

fn str1(node: &dyn Node, args: Vec<(&str, Option<Value>)>) -> String {
    text(&run(node, args)[0])
}

#[test]
fn string_nodes_follow_python() {
    assert_eq!(int(&run(&strings::StringLength, vec![("string", s("héllo ǅ"))])[0]), 7);
    let sub = |st: &str, a: i128, e: i128| str1(&strings::StringSubstring, vec![("string", s(st)), ("start", i(a)), ("end", i(e))]);
    assert_eq!(sub("héllo", -3, 10), "llo");
    assert_eq!(sub("héllo", 1, 3), "él");
    assert_eq!(sub("héllo", 3, 1), "");
    assert_eq!(sub("héllo", -10, -4), "h");
    assert_eq!(sub("héllo", 0, 0), "");
    let rep = |st: &str, find: &str, r: &str| str1(&strings::StringReplace, vec![("string", s(st)), ("find", s(find)), ("replace", s(r))]);
    assert_eq!(rep("ab", "", "-"), "-a-b-");
    assert_eq!(rep("a.b.c", ".", "::"), "a::b::c");
    let contains =
        |st: &str, sub: &str, cs: bool| boolean(&run(&strings::StringContains, vec![("string", s(st)), ("substring", s(sub)), ("case_sensitive", b(cs))])[0]);
    assert!(contains("Hello World", "World", true));
    assert!(!contains("Hello World", "world", true));
    assert!(contains("Hello WORLD", "world", false));
    let cmp = |x: &str, y: &str, mode: &str, cs: bool| {
        boolean(&run(&strings::StringCompare, vec![("string_a", s(x)), ("string_b", s(y)), ("mode", s(mode)), ("case_sensitive", b(cs))])[0])
    };
    assert!(cmp("Hello", "He", "Starts With", true));
    assert!(!cmp("Hello", "he", "Starts With", true));
    assert!(cmp("Hello", "he", "Starts With", false));
    assert!(cmp("Hello", "LO", "Ends With", false));
    assert!(!cmp("Hello", "Hell", "Equal", true));
    assert!(cmp("ΑΣ", "ας", "Equal", false));
    let trim = |st: &str, mode: &str| str1(&strings::StringTrim, vec![("string", s(st)), ("mode", s(mode))]);
    // U+001C..U+001F are space to Python's str.isspace().
    assert_eq!(trim(" \x1c\u{2003} hi \x1f\n", "Both"), "hi");
    assert_eq!(trim("  hi  ", "Left"), "hi  ");
    assert_eq!(trim("  hi  ", "Right"), "  hi");
    let case = |st: &str, mode: &str| str1(&strings::CaseConverter, vec![("string", s(st)), ("mode", s(mode))]);
    assert_eq!(case("straße", "UPPERCASE"), "STRASSE");
    assert_eq!(case("ΑΣ Σ", "lowercase"), "ας σ");
    // Python's values: "ǆx ßa they're 1st ﬁsh ᾳb ΑΣ".title(), "ǆX".capitalize(), "AΣ".capitalize().
    assert_eq!(case("ǆx ßa they're 1st ﬁsh ᾳb ΑΣ", "Title Case"), "ǅx Ssa They'Re 1St Fish ᾼb Ας");
    assert_eq!(case("ǆX", "Capitalize"), "ǅx");
    assert_eq!(case("ßa", "Capitalize"), "Ssa");
    assert_eq!(case("AΣ", "Capitalize"), "Aς");
    assert_eq!(case("hello WORLD", "Capitalize"), "Hello world");
}

fn re_args<'a>(st: &str, pattern: &str) -> Vec<(&'a str, Option<Value>)> {
    vec![("string", s(st)), ("regex_pattern", s(pattern)), ("case_insensitive", b(true)), ("multiline", b(false)), ("dotall", b(false))]
}

#[test]
fn regex_nodes_follow_python_re() {
    let matches = |st: &str, p: &str, ci: bool| {
        let mut a = re_args(st, p);
        a[2].1 = b(ci);
        boolean(&run(&strings::RegexMatch, a)[0])
    };
    assert!(matches("Hello", "^h.l+", true));
    assert!(!matches("Hello", "^h.l+", false));
    // An invalid pattern does not match (ComfyUI catches re.error) …
    assert!(!matches("a(", "(", true));
    // … but Python syntax the regex crate lacks is an error naming the pattern.
    let e = err(&strings::RegexMatch, re_args("abab", r"(ab)\1"));
    assert!(e.contains("regex_pattern") && e.contains("backreference"), "{e}");
    let e = err(&strings::RegexMatch, re_args("ab", "a(?=b)"));
    assert!(e.contains("regex_pattern") && e.contains("look-around"), "{e}");
    // Python's \Z is the end of the text.
    assert!(matches("ab", r"b\Z", true));
    assert!(!matches("ab\n", r"b\Z", true));
    let dotall = |st: &str, p: &str, on: bool| {
        let mut a = re_args(st, p);
        a[4].1 = b(on);
        boolean(&run(&strings::RegexMatch, a)[0])
    };
    assert!(!dotall("a\nb", "a.b", false));
    assert!(dotall("a\nb", "a.b", true));

    let extract = |st: &str, p: &str, mode: &str, k: i128| {
        let mut a = re_args(st, p);
        a.push(("mode", s(mode)));
        a.push(("group_index", i(k)));
        call(&strings::RegexExtract, a).map(|v| text(&v[0])).map_err(|e| e.to_string())
    };
    assert_eq!(extract("x12y345", r"\d+", "First Match", 1).unwrap(), "12");
    assert_eq!(extract("x12y345", r"\d+", "All Matches", 1).unwrap(), "12\n345");
    // findall with groups gives the first group; Python's [('a', 'b'), ('a', '')].
    assert_eq!(extract("ab a", r"(a)(b)?", "All Matches", 1).unwrap(), "a\na");
    assert_eq!(extract("k=v; k2=v2", r"(\w+)=(\w+)", "First Group", 2).unwrap(), "v");
    assert_eq!(extract("k=v; k2=v2", r"(\w+)=(\w+)", "First Group", 3).unwrap(), "");
    assert_eq!(extract("k=v; k2=v2", r"(\w+)=(\w+)", "All Groups", 1).unwrap(), "k\nk2");
    assert_eq!(extract("k=v", r"\w", "All Groups", 0).unwrap(), "");
    // Python's None group: "" for First Group; All Groups' join raises, an error here.
    assert_eq!(extract("b", "(a)|(b)", "First Group", 1).unwrap(), "");
    let e = extract("ab", "(a)|(b)", "All Groups", 1).unwrap_err();
    assert!(e.contains("group_index"), "{e}");
    assert_eq!(extract("abc", "(", "First Match", 1).unwrap(), "");

    let replace = |st: &str, p: &str, r: &str, count: Option<i128>| {
        let mut a = vec![("string", s(st)), ("regex_pattern", s(p)), ("replace", s(r))];
        if let Some(c) = count {
            a.push(("count", i(c)));
        }
        call(&strings::RegexReplace, a).map(|v| text(&v[0])).map_err(|e| e.to_string())
    };
    // Python 3.7+ reports the empty match after "aa": re.sub('a*', '-', 'baac') == '-b--c-'.
    assert_eq!(replace("baac", "a*", "-", None).unwrap(), "-b--c-");
    assert_eq!(replace("abc", "x*", "-", Some(2)).unwrap(), "-a-bc");
    assert_eq!(replace("me@host x@y", r"(\w+)@(\w+)", r"\2 at \g<1>$\n", None).unwrap(), "host at me$\n y at x$\n");
    assert_eq!(replace("Aa", "a", "b", None).unwrap(), "bb");
    assert_eq!(replace("k=v", r"(?P<key>\w)=", r"\g<key>:", None).unwrap(), "k:v");
    // re.error is not caught by RegexReplace: an invalid pattern or template is an error.
    assert!(replace("abc", "(", "x", None).unwrap_err().contains("regex_pattern"));
    assert!(replace("abc", "b", r"\q", None).unwrap_err().contains("replace"));
    assert!(replace("abc", "b", r"\3", None).unwrap_err().contains("replace"));
}

#[test]
fn image_size_empty_image_flip_rotate() {
    let x = ramp(&[2, 3, 4, 3]);
    let out = run(&image::GetImageSize, vec![("image", img(&x))]);
    assert_eq!(out.iter().map(int).collect::<Vec<_>>(), vec![4, 3, 2]);

    let e = tensor(&run(&image::EmptyImage, vec![("width", i(3)), ("height", i(2)), ("batch_size", i(2)), ("color", i(0xFF8000))])[0]);
    assert_eq!(e.size(), vec![2, 2, 3, 3]);
    assert_eq!(vals(&e.get(1).get(1).get(2)), vec![1.0, (128.0f64 / 255.0) as f32, 0.0]);

    let x = ramp(&[1, 2, 3, 1]); // rows [0 1 2], [3 4 5]
    let flip = |m: &str| vals(&tensor(&run(&image::ImageFlip, vec![("image", img(&x)), ("flip_method", s(m))])[0]));
    assert_eq!(flip("x-axis: vertically"), vec![3., 4., 5., 0., 1., 2.]);
    assert_eq!(flip("y-axis: horizontally"), vec![2., 1., 0., 5., 4., 3.]);
    let rot = |m: &str| tensor(&run(&image::ImageRotate, vec![("image", img(&x)), ("rotation", s(m))])[0]);
    // Clockwise: the bottom-left pixel goes to the top-left.
    assert_eq!(rot("90 degrees").size(), vec![1, 3, 2, 1]);
    assert_eq!(vals(&rot("90 degrees")), vec![3., 0., 4., 1., 5., 2.]);
    assert_eq!(vals(&rot("180 degrees")), vec![5., 4., 3., 2., 1., 0.]);
    assert_eq!(vals(&rot("270 degrees")), vec![2., 5., 1., 4., 0., 3.]);
    assert_eq!(vals(&rot("none")), vals(&x));
}

#[test]
fn latent_flip_rotate_crop_keep_the_mask() {
    let x = ramp(&[1, 1, 2, 3]);
    let nm = Tensor::ones([1, 1, 16, 24], (Kind::Float, Device::Cpu));
    let l = || lat(&x, Some(&nm), Some(vec![4]));
    let out = latent_of(&run(&latent::LatentFlip, vec![("samples", l()), ("flip_method", s("y-axis: horizontally"))])[0]);
    assert_eq!(vals(&out.samples), vec![2., 1., 0., 5., 4., 3.]);
    assert_eq!(out.noise_mask.unwrap().size(), vec![1, 1, 16, 24]);
    assert_eq!(out.batch_index, Some(vec![4]));
    let out = latent_of(&run(&latent::LatentFlip, vec![("samples", l()), ("flip_method", s("x-axis: vertically"))])[0]);
    assert_eq!(vals(&out.samples), vec![3., 4., 5., 0., 1., 2.]);
    let out = latent_of(&run(&latent::LatentRotate, vec![("samples", l()), ("rotation", s("90 degrees"))])[0]);
    assert_eq!(out.samples.size(), vec![1, 1, 3, 2]);
    assert_eq!(vals(&out.samples), vec![3., 0., 4., 1., 5., 2.]);
    // The noise mask is not rotated (ComfyUI).
    assert_eq!(out.noise_mask.unwrap().size(), vec![1, 1, 16, 24]);

    let big = ramp(&[1, 1, 10, 12]);
    let crop = |t: &Tensor, w: i128, h: i128, x: i128, y: i128| {
        tensor(&run(&latent::LatentCrop, vec![("samples", lat(t, None, None)), ("width", i(w)), ("height", i(h)), ("x", i(x)), ("y", i(y))])[0])
    };
    // x = 16 px → 2; the crop 64 px → 8 wide is cut at the edge: columns 2..12 … but x is kept ≤ w − 8 = 4.
    let c = crop(&big, 64, 64, 16, 8);
    assert_eq!(c.size(), vec![1, 1, 8, 8]);
    assert_eq!(vals(&c.get(0).get(0).get(0))[0], 14.0); // row 1, column 2
    let c = crop(&big, 64, 64, 80, 80); // x = 10 → 4, y = 10 → 2
    assert_eq!(c.size(), vec![1, 1, 8, 8]);
    assert_eq!(vals(&c)[0], (2 * 12 + 4) as f32);
    // A latent under 8 wide: x = 5 − 8 = −3 counts from the end (Python slicing), up to x + 8 = 5.
    let small = ramp(&[1, 1, 8, 5]);
    let c = crop(&small, 64, 64, 0, 0);
    assert_eq!(c.size(), vec![1, 1, 8, 3]);
    assert_eq!(vals(&c.get(0).get(0).get(0)), vec![2., 3., 4.]);
}

#[test]
fn latent_arithmetic() {
    let x = ramp(&[1, 2, 2, 2]);
    let nm = Tensor::ones([1, 1, 16, 16], (Kind::Float, Device::Cpu));
    let out = latent_of(&run(&latent::LatentMultiply, vec![("samples", lat(&x, Some(&nm), Some(vec![3]))), ("multiplier", f(-0.5))])[0]);
    assert_eq!(vals(&out.samples)[..3], [0.0, -0.5, -1.0]);
    assert!(out.noise_mask.is_some() && out.batch_index == Some(vec![3]));

    let one = Tensor::ones([1, 2, 2, 2], (Kind::Float, Device::Cpu));
    let two = |a: &Tensor, b: &Tensor| vec![("samples1", lat(a, Some(&nm), None)), ("samples2", lat(b, None, Some(vec![7])))];
    // samples2's batch of 1 is repeated to samples1's 2; samples1's keys are kept.
    let x2 = ramp(&[2, 2, 2, 2]);
    let out = latent_of(&run(&latent::LatentAdd, two(&x2, &one))[0]);
    assert_eq!(vals(&out.samples), vals(&(&x2 + 1.0)));
    assert!(out.noise_mask.is_some() && out.batch_index.is_none());
    let out = latent_of(&run(&latent::LatentSubtract, two(&x2, &one))[0]);
    assert_eq!(vals(&out.samples), vals(&(&x2 - 1.0)));
    // A different size is resized bilinearly (a constant stays constant).
    let big = Tensor::full([1, 2, 4, 4], 3.0, (Kind::Float, Device::Cpu));
    assert_eq!(vals(&tensor(&run(&latent::LatentAdd, two(&x, &big))[0])), vals(&(&x + 3.0)));
    // Channels differing (not 1) cannot be added: an error naming samples2.
    let three = Tensor::ones([1, 3, 2, 2], (Kind::Float, Device::Cpu));
    assert!(err(&latent::LatentAdd, two(&x, &three)).contains("samples2"));

    // LatentBlend: blend_factor weights samples1.
    let out = tensor(&run(&latent::LatentBlend, vec![("samples1", lat(&x, None, None)), ("samples2", lat(&one, None, None)), ("blend_factor", f(0.25))])[0]);
    assert_eq!(vals(&out), vals(&(&x * 0.25 + &one * 0.75)));
    let two_items = Tensor::ones([2, 2, 2, 2], (Kind::Float, Device::Cpu));
    let three_items = Tensor::ones([3, 2, 2, 2], (Kind::Float, Device::Cpu));
    let e = err(&latent::LatentBlend, vec![("samples1", lat(&two_items, None, None)), ("samples2", lat(&three_items, None, None)), ("blend_factor", f(0.5))]);
    assert!(e.contains("samples2"), "{e}");
}

#[test]
fn latent_batches_and_seed_behaviour() {
    let a = ramp(&[1, 4, 2, 2]);
    let bigger = Tensor::ones([2, 4, 4, 4], (Kind::Float, Device::Cpu));
    let nm = Tensor::ones([1, 1, 16, 16], (Kind::Float, Device::Cpu));
    let out = latent_of(&run(&latent::LatentBatch, vec![("samples1", lat(&a, Some(&nm), None)), ("samples2", lat(&bigger, None, None))])[0]);
    assert_eq!(out.samples.size(), vec![3, 4, 2, 2]);
    // Indices are not offset: [0] + [0, 1].
    assert_eq!(out.batch_index, Some(vec![0, 0, 1]));
    assert_eq!(out.noise_mask.unwrap().size(), vec![1, 1, 16, 16]);
    let out = latent_of(&run(&latent::LatentBatch, vec![("samples1", lat(&a, None, Some(vec![5]))), ("samples2", lat(&a, None, Some(vec![2])))])[0]);
    assert_eq!(out.batch_index, Some(vec![5, 2]));

    let three = Tensor::zeros([3, 4, 2, 2], (Kind::Float, Device::Cpu));
    let seed = |bi: Option<Vec<i64>>, mode: &str| {
        latent_of(&run(&latent::LatentBatchSeedBehavior, vec![("samples", lat(&three, None, bi)), ("seed_behavior", s(mode))])[0]).batch_index
    };
    assert_eq!(seed(None, "fixed"), Some(vec![0, 0, 0]));
    assert_eq!(seed(Some(vec![4, 5, 6]), "fixed"), Some(vec![4, 4, 4]));
    assert_eq!(seed(Some(vec![4, 5, 6]), "random"), None);
    // The combo's default is "fixed" (not its first option), as ComfyUI.
    let spec = latent::LatentBatchSeedBehavior.schema();
    assert_eq!(text(&spec.input_spec("seed_behavior").unwrap().kind.default_value().unwrap()), "fixed");
    let d = Dir::new();
    let nodes = r#""e": (type: "EmptyLatentImage", inputs: {"width": 64, "height": 64, "batch_size": 2}),
        "s": (type: "LatentBatchSeedBehavior", inputs: {"samples": Link("e", "LATENT")}),"#;
    let got = outputs(&d, nodes, &[("s", "LATENT", 0)]).unwrap();
    assert_eq!(latent_of(&got[0]).batch_index, Some(vec![0, 0]));
}

#[test]
fn latent_composite_masked() {
    let dest = Tensor::zeros([2, 1, 4, 4], (Kind::Float, Device::Cpu));
    let src = Tensor::ones([1, 1, 2, 2], (Kind::Float, Device::Cpu));
    let args = |x: i128, y: i128, m: Option<Value>| {
        let mut a =
            vec![("destination", lat(&dest, None, Some(vec![1, 2]))), ("source", lat(&src, None, None)), ("x", i(x)), ("y", i(y)), ("resize_source", b(false))];
        a.push(("mask", m));
        a
    };
    // x = 20 px → column 2; y = 24 → row 3 (clipped to one row). The source batch of 1 is repeated.
    let out = latent_of(&run(&latent::LatentCompositeMasked, args(20, 24, None))[0]);
    assert_eq!(out.batch_index, Some(vec![1, 2]));
    let o = out.samples;
    assert_eq!(o.sum(Kind::Float).double_value(&[]), 4.0);
    assert_eq!(vals(&o.get(1).get(0).get(3)), vec![0., 0., 1., 1.]);
    // The input is not written to.
    assert_eq!(dest.sum(Kind::Float).double_value(&[]), 0.0);
    // A mask of 0.5 mixes half; x at the far edge is a no-op.
    let half = Tensor::full([1, 8, 8], 0.5, (Kind::Float, Device::Cpu));
    let o = tensor(&run(&latent::LatentCompositeMasked, args(0, 0, msk(&half)))[0]);
    assert_eq!(o.sum(Kind::Float).double_value(&[]), 2.0 * 4.0 * 0.5);
    let o = tensor(&run(&latent::LatentCompositeMasked, args(32, 0, None))[0]);
    assert_eq!(o.sum(Kind::Float).double_value(&[]), 0.0);
    // resize_source stretches the source over the destination.
    let mut a = args(0, 0, None);
    a[4].1 = b(true);
    assert_eq!(tensor(&run(&latent::LatentCompositeMasked, a)[0]).sum(Kind::Float).double_value(&[]), 32.0);
}

#[test]
fn mask_threshold_crop_and_colour() {
    let m = Tensor::from_slice(&[0.2f32, 0.5, 0.51, 0.9]).reshape([2, 2]);
    let t = tensor(&run(&mask::ThresholdMask, vec![("mask", msk(&m)), ("value", f(0.5))])[0]);
    // Strictly above, and a 2-D mask stays 2-D.
    assert_eq!(t.size(), vec![2, 2]);
    assert_eq!(vals(&t), vec![0., 0., 1., 1.]);

    let m = ramp(&[1, 4, 5]);
    let crop = |x: i128, y: i128, w: i128, h: i128| {
        tensor(&run(&mask::CropMask, vec![("mask", msk(&m)), ("x", i(x)), ("y", i(y)), ("width", i(w)), ("height", i(h))])[0])
    };
    assert_eq!(vals(&crop(1, 2, 2, 9)), vec![11., 12., 16., 17.]);
    // Past the edge the crop is empty, not an error (Python slicing).
    assert_eq!(crop(7, 0, 2, 2).size(), vec![1, 2, 0]);

    let px = Tensor::from_slice(&[1.0f32, 0.5, 0.0, 1.0, 0.5 - 0.5 / 255.0, 0.0, 1.2, 128.0 / 255.0, -1.0]).reshape([1, 1, 3, 3]);
    // 0.5 * 255 = 127.5 rounds to 128 (and 127.0 does not match); out-of-range values are clamped first.
    let c = tensor(&run(&mask::ImageColorToMask, vec![("image", img(&px)), ("color", i(0xFF8000))])[0]);
    assert_eq!(vals(&c), vec![1., 0., 1.]);
    assert!(err(&mask::ImageColorToMask, vec![("image", img(&Tensor::zeros([1, 2, 2, 1], (Kind::Float, Device::Cpu)))), ("color", i(0))]).contains("image"));
}

#[test]
fn split_and_join_alpha() {
    let rgba = ramp(&[2, 1, 2, 4]) / 16.0;
    let out = run(&mask::SplitImageWithAlpha, vec![("image", img(&rgba))]);
    assert_eq!(tensor(&out[0]).size(), vec![2, 1, 2, 3]);
    assert_eq!(vals(&tensor(&out[1])), vec![1.0 - 3.0 / 16.0, 1.0 - 7.0 / 16.0, 1.0 - 11.0 / 16.0, 1.0 - 15.0 / 16.0]);
    let rgb = Tensor::ones([1, 2, 2, 3], (Kind::Float, Device::Cpu));
    let out = run(&mask::SplitImageWithAlpha, vec![("image", img(&rgb))]);
    assert_eq!(vals(&tensor(&out[1])), vec![0.0; 4]);

    // One mask for two images gives ONE image (ComfyUI truncates to the smaller batch).
    let images = Tensor::zeros([2, 2, 2, 3], (Kind::Float, Device::Cpu));
    let alpha = Tensor::from_slice(&[0.0f32, 0.25, 0.5, 1.0]).reshape([1, 2, 2]);
    let j = tensor(&run(&mask::JoinImageWithAlpha, vec![("image", img(&images)), ("alpha", msk(&alpha))])[0]);
    assert_eq!(j.size(), vec![1, 2, 2, 4]);
    assert_eq!(vals(&j.select(3, 3)), vec![1.0, 0.75, 0.5, 0.0]);
    // A mask of another size is resized bilinearly.
    let small = Tensor::full([2, 1, 1], 0.25, (Kind::Float, Device::Cpu));
    let j = tensor(&run(&mask::JoinImageWithAlpha, vec![("image", img(&images)), ("alpha", msk(&small))])[0]);
    assert_eq!(j.size(), vec![2, 2, 2, 4]);
    assert_eq!(vals(&j.select(3, 3)), vec![0.75; 8]);
}

#[test]
fn image_batches() {
    let rgb = Tensor::zeros([1, 2, 2, 3], (Kind::Float, Device::Cpu));
    let rgba = Tensor::full([2, 4, 4, 4], 0.5, (Kind::Float, Device::Cpu));
    // image1 gets an alpha of 1; image2 is resized to 2×2.
    let out = tensor(&run(&image::ImageBatch, vec![("image1", img(&rgb)), ("image2", img(&rgba))])[0]);
    assert_eq!(out.size(), vec![3, 2, 2, 4]);
    assert_eq!(vals(&out.get(0).get(0).get(0)), vec![0., 0., 0., 1.]);
    assert_eq!(vals(&out.get(2).get(1).get(1)), vec![0.5; 4]);
    let grey = Tensor::zeros([1, 2, 2, 1], (Kind::Float, Device::Cpu));
    assert!(err(&image::ImageBatch, vec![("image1", img(&grey)), ("image2", img(&rgb))]).contains("image2"));

    let x = ramp(&[2, 1, 1, 1]);
    let r = tensor(&run(&image::RepeatImageBatch, vec![("image", img(&x)), ("amount", i(3))])[0]);
    assert_eq!(vals(&r), vec![0., 1., 0., 1., 0., 1.]);
    let x = ramp(&[5, 1, 1, 1]);
    let from = |bi: i128, len: i128| vals(&tensor(&run(&image::ImageFromBatch, vec![("image", img(&x)), ("batch_index", i(bi)), ("length", i(len))])[0]));
    assert_eq!(from(1, 2), vec![1., 2.]);
    assert_eq!(from(9, 3), vec![4.]);
    assert_eq!(from(3, 9), vec![3., 4.]);
}

/// Runs tests/parity/utility_reference.py (ComfyUI's node bodies) and compares.
#[test]
fn non_trivial_nodes_match_comfyui_reference() {
    let d = Dir::new();
    crate::parity::run_reference("utility_reference.py", &[d.path()]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&d.join("utility_expected.safetensors")).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    let image_in = get("input.image");

    // ImageAddNoise: torch.manual_seed(seed) + randn on the CPU, bit for bit.
    for (seed, strength) in [(0i128, 0.5), (123456789, 0.25), (u64::MAX as i128, 1.0)] {
        let got = tensor(&run(&image::ImageAddNoise, vec![("image", img(&image_in)), ("seed", i(seed)), ("strength", f(strength))])[0]);
        assert_eq!(max_abs_diff(&got, &get(&format!("add_noise.{seed}.{strength:?}"))), 0.0, "ImageAddNoise {seed} {strength}");
    }
    // ImageScaleToTotalPixels (sizes from f64 maths, torch's interpolate).
    for (method, mp, steps) in [("bilinear", 0.01, 1), ("area", 0.002, 8), ("nearest-exact", 0.05, 3), ("bicubic", 0.0123, 64)] {
        let got = tensor(
            &run(
                &image::ImageScaleToTotalPixels,
                vec![("image", img(&image_in)), ("upscale_method", s(method)), ("megapixels", f(mp)), ("resolution_steps", i(steps))],
            )[0],
        );
        let want = get(&format!("total_pixels.{method}.{mp:?}.{steps}"));
        assert_eq!(got.size(), want.size(), "{method} {mp} {steps}");
        assert!(max_abs_diff(&got, &want) < 1e-6, "{method} {mp} {steps}");
    }
    // LatentInterpolate, batch 1 and ComfyUI's batch-equals-channels quirk.
    for name in ["b1", "b4"] {
        let (s1, s2) = (get(&format!("interp.{name}.s1")), get(&format!("interp.{name}.s2")));
        for ratio in [0.0, 0.3, 1.0] {
            let got =
                tensor(&run(&latent::LatentInterpolate, vec![("samples1", lat(&s1, None, None)), ("samples2", lat(&s2, None, None)), ("ratio", f(ratio))])[0]);
            assert!(max_abs_diff(&got, &get(&format!("interp.{name}.{ratio:?}"))) < 1e-6, "LatentInterpolate {name} {ratio}");
        }
    }
    // ImageBlur and ImageSharpen: torch's conv2d on the CPU, as ComfyUI's CPU path.
    for (r, sigma) in [(1i128, 1.0), (3, 0.5), (5, 2.5)] {
        let got = tensor(&run(&image::ImageBlur, vec![("image", img(&image_in)), ("blur_radius", i(r)), ("sigma", f(sigma))])[0]);
        assert!(max_abs_diff(&got, &get(&format!("blur.{r}.{sigma:?}"))) < 1e-6, "ImageBlur {r} {sigma}");
    }
    for (r, sigma, alpha) in [(1i128, 1.0, 1.0), (2, 0.3, 0.5), (4, 3.0, 2.0), (1, 1.0, 0.0)] {
        let args = vec![("image", img(&image_in)), ("sharpen_radius", i(r)), ("sigma", f(sigma)), ("alpha", f(alpha))];
        let got = tensor(&run(&image::ImageSharpen, args)[0]);
        assert!(max_abs_diff(&got, &get(&format!("sharpen.{r}.{sigma:?}.{alpha:?}"))) < 1e-5, "ImageSharpen {r} {sigma} {alpha}");
    }
    // alpha 0 is the identity kernel: only the clamp.
    let got = tensor(&run(&image::ImageSharpen, vec![("image", img(&image_in)), ("sharpen_radius", i(2)), ("sigma", f(1.0)), ("alpha", f(0.0))])[0]);
    assert!(max_abs_diff(&got, &image_in) < 1e-6);
    let e = err(&image::ImageBlur, vec![("image", img(&image_in.narrow(1, 0, 4))), ("blur_radius", i(4)), ("sigma", f(1.0))]);
    assert!(e.contains("blur_radius"), "{e}");
    // ResizeAndPadImage, ImageScaleToMaxDimension and ImageStitch: exact but for lanczos, which ComfyUI runs
    // through 8-bit PIL images and diffloom in f32 (on these smooth images within two 8-bit steps; 1.84 seen).
    let lanczos_tolerance = 2.5 / 255.0;
    let smooth = get("input.smooth");
    for (w, h, color, method) in [
        (64, 64, "white", "area"),
        (30, 50, "black", "bicubic"),
        (100, 20, "white", "nearest-exact"),
        (53, 37, "black", "bilinear"),
        (40, 40, "white", "lanczos"),
        (1, 100, "black", "area"),
    ] {
        let src = if method == "lanczos" { &smooth } else { &image_in };
        let args = vec![("image", img(src)), ("target_width", i(w)), ("target_height", i(h)), ("padding_color", s(color)), ("interpolation", s(method))];
        let got = tensor(&run(&image::ResizeAndPadImage, args)[0]);
        let want = get(&format!("resize_pad.{w}.{h}.{color}.{method}"));
        let tolerance = if method == "lanczos" { lanczos_tolerance } else { 1e-6 };
        assert!(max_abs_diff(&got, &want) < tolerance, "ResizeAndPadImage {w} {h} {color} {method}");
    }
    for (method, size) in [("area", 20), ("bilinear", 71), ("nearest-exact", 13), ("bicubic", 100), ("lanczos", 30)] {
        let src = if method == "lanczos" { &smooth } else { &image_in };
        for (which, input) in [("wide", src.shallow_clone()), ("tall", src.transpose(1, 2).contiguous())] {
            let got = tensor(&run(&image::ImageScaleToMaxDimension, vec![("image", img(&input)), ("upscale_method", s(method)), ("largest_size", i(size))])[0]);
            let want = get(&format!("max_dim.{method}.{size}.{which}"));
            let tolerance = if method == "lanczos" { lanczos_tolerance } else { 1e-6 };
            assert!(max_abs_diff(&got, &want) < tolerance, "ImageScaleToMaxDimension {method} {size} {which}");
        }
    }
    let (s1, s2) = (get("stitch.image1"), get("stitch.image2"));
    for direction in ["right", "down", "left", "up"] {
        for (m, sp, color) in [(false, 0, "white"), (false, 3, "red"), (false, 4, "black"), (true, 2, "blue"), (true, 0, "white")] {
            let args = vec![
                ("image1", img(&s1)),
                ("direction", s(direction)),
                ("match_image_size", b(m)),
                ("spacing_width", i(sp)),
                ("spacing_color", s(color)),
                ("image2", img(&s2)),
            ];
            let got = tensor(&run(&image::ImageStitch, args)[0]);
            let want = get(&format!("stitch.{direction}.{}.{sp}.{color}", if m { "True" } else { "False" }));
            let tolerance = if m { lanczos_tolerance } else { 0.0 };
            assert!(max_abs_diff(&got, &want) <= tolerance, "ImageStitch {direction} {m} {sp} {color}");
        }
    }
    // PorterDuffImageComposite: every mode, with resized source and source alpha, batches 2/2/2/3 → 2.
    let pd: Vec<Tensor> = ["source", "source_alpha", "destination", "destination_alpha"].iter().map(|k| get(&format!("pd.{k}"))).collect();
    for mode in mask::PORTER_DUFF_MODES {
        let args =
            vec![("source", img(&pd[0])), ("source_alpha", msk(&pd[1])), ("destination", img(&pd[2])), ("destination_alpha", msk(&pd[3])), ("mode", s(mode))];
        let out = run(&mask::PorterDuffImageComposite, args);
        assert!(max_abs_diff(&tensor(&out[0]), &get(&format!("porter_duff.{mode}"))) < 1e-5, "Porter-Duff image {mode}");
        assert!(max_abs_diff(&tensor(&out[1]), &get(&format!("porter_duff_mask.{mode}"))) < 1e-5, "Porter-Duff mask {mode}");
    }
    let spec = mask::PorterDuffImageComposite.schema();
    assert_eq!(text(&spec.input_spec("mode").unwrap().kind.default_value().unwrap()), "DST");
    let grey = Tensor::zeros([2, 24, 32, 1], (Kind::Float, Device::Cpu));
    let args =
        vec![("source", img(&grey)), ("source_alpha", msk(&pd[1])), ("destination", img(&pd[2])), ("destination_alpha", msk(&pd[3])), ("mode", s("SRC"))];
    assert!(err(&mask::PorterDuffImageComposite, args).contains("source"));
    // Any other batch is ComfyUI's size error, named here.
    let s3 = Tensor::ones([3, 4, 2, 2], (Kind::Float, Device::Cpu));
    let e = err(&latent::LatentInterpolate, vec![("samples1", lat(&s3, None, None)), ("samples2", lat(&s3, None, None)), ("ratio", f(0.5))]);
    assert!(e.contains("samples1") && e.contains("batch"), "{e}");
}

/// Runs `node` with `input` as the input directory, `output` as the output directory and `texts` as
/// what saved files carry (ComfyUI's `prompt`/`workflow`); returns the outputs or the error, and the UI.
fn call_in(
    node: &dyn Node,
    args: Vec<(&str, Option<Value>)>,
    input: &Path,
    output: &Path,
    texts: &[(&str, &str)],
) -> (Result<Vec<Value>, String>, serde_json::Map<String, serde_json::Value>) {
    let args = Args::new(args.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let folders = Folders { input_dir: input.to_path_buf(), temp_dir: output.join("temp"), ..Folders::default() };
    let texts = |_: u32, _: u32| texts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let registry = Registry::new();
    let mut cx = Ctx {
        device: Device::Cpu,
        node_id: "n",
        files: Locator { graph_dir: input, folders: &folders, output_dir: output },
        output_dir: output,
        image_texts: &texts,
        cancel: &cancel,
        dtype: Kind::Float,
        messages: Vec::new(),
        ui: serde_json::Map::new(),
        progress: &|_, _, _| {},
        registry: &registry,
    };
    let r = node.execute(&mut cx, &args).map_err(|e| e.to_string());
    (r, cx.ui)
}

#[test]
fn save_and_load_latent() {
    let d = Dir::new();
    let (input, output) = (d.join("input"), d.join("output"));
    std::fs::create_dir_all(&input).unwrap();
    let x = Tensor::randn([2, 4, 5, 7], (Kind::Float, Device::Cpu));
    let mask = Tensor::ones([1, 40, 56], (Kind::Float, Device::Cpu));
    let texts = [("prompt", r#"{"1": {"class_type": "EmptyLatentImage", "inputs": {}}}"#), ("workflow", r#"{"nodes": []}"#), ("parameters", "a1111")];
    let save = |prefix: &str| {
        let (r, ui) =
            call_in(&latent::SaveLatent, vec![("samples", lat(&x, Some(&mask), Some(vec![3, 4]))), ("filename_prefix", s(prefix))], &input, &output, &texts);
        r.unwrap();
        ui
    };
    // ComfyUI's default prefix and numbering; a second save never overwrites the first.
    let spec = latent::SaveLatent.schema();
    assert_eq!(text(&spec.input_spec("filename_prefix").unwrap().kind.default_value().unwrap()), "latents/ComfyUI");
    let ui = save("latents/ComfyUI");
    assert_eq!(ui["latents"], serde_json::json!([{"filename": "ComfyUI_00001_.latent", "subfolder": "latents", "type": "output"}]));
    save("latents/ComfyUI");
    assert_eq!(d.files("output/latents"), vec!["ComfyUI_00001_.latent", "ComfyUI_00002_.latent"]);
    let file = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&output.join("latents/ComfyUI_00001_.latent")).unwrap();
    let mut keys: Vec<&String> = file.tensors().keys().collect();
    keys.sort();
    assert_eq!(keys, vec!["latent_format_version_0", "latent_tensor"]);
    assert_eq!(file.info("latent_format_version_0").unwrap().shape, vec![0i64]);
    assert_eq!(file.metadata.get("prompt").map(String::as_str), Some(texts[0].1));
    assert_eq!(file.metadata.get("workflow").map(String::as_str), Some(texts[1].1));
    assert!(!file.metadata.contains_key("parameters"));
    // Without a prompt ComfyUI still writes an empty one.
    let (r, _) = call_in(&latent::SaveLatent, vec![("samples", lat(&x, None, None)), ("filename_prefix", s("bare"))], &input, &output, &[]);
    r.unwrap();
    let bare = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&output.join("bare_00001_.latent")).unwrap();
    assert_eq!(bare.metadata.get("prompt").map(String::as_str), Some(""));
    let (r, _) = call_in(&latent::SaveLatent, vec![("samples", lat(&x, None, None)), ("filename_prefix", s("../out"))], &input, &output, &[]);
    assert!(r.unwrap_err().contains("filename_prefix"));

    // Round trip: the samples only (LoadLatent gives no noise mask or batch index).
    std::fs::copy(output.join("latents/ComfyUI_00002_.latent"), input.join("a.latent")).unwrap();
    let load = |name: &str| call_in(&latent::LoadLatent, vec![("latent", s(name))], &input, &output, &[]).0;
    let back = latent_of(&load("a.latent").unwrap()[0]);
    assert_eq!(max_abs_diff(&back.samples.0, &x), 0.0);
    assert!(back.noise_mask.is_none() && back.batch_index.is_none());
    // ComfyUI's annotations pick the folder.
    let back = latent_of(&load("latents/ComfyUI_00001_.latent [output]").unwrap()[0]);
    assert_eq!(max_abs_diff(&back.samples.0, &x), 0.0);
    // The change token is the file's hash: the same bytes give the same token.
    let folders = Folders { input_dir: input.clone(), ..Folders::default() };
    let loc = Locator { graph_dir: &input, folders: &folders, output_dir: &output };
    let token = |name: &str| latent::LoadLatent.change_token(&loc, &Args::new(vec![("latent".into(), s(name))])).unwrap().unwrap();
    assert_eq!(token("a.latent"), token("latents/ComfyUI_00002_.latent [output]"));
    assert_ne!(token("a.latent"), token("bare_00001_.latent [output]"));
    // Errors name the input or the file, without panicking.
    assert!(load("missing.latent").unwrap_err().contains("latent"));
    d.write("input/junk.latent", b"not safetensors");
    assert!(load("junk.latent").unwrap_err().contains("junk.latent"));
    diffloom_nodes::checkpoint::synthetic::write_safetensors(&input.join("other.latent"), &[("x".into(), x.shallow_clone())], None).unwrap();
    let e = load("other.latent").unwrap_err();
    assert!(e.contains("latent_tensor"), "{e}");

    // Files ComfyUI writes (tests/parity/utility_reference.py --latents): the current format as is, the
    // old one divided by 0.18215; and ComfyUI's LoadLatent reads diffloom's file.
    crate::parity::run_reference("utility_reference.py", &[Path::new("--latents"), &input, &output.join("latents/ComfyUI_00001_.latent")]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&input.join("latent_expected.safetensors")).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    assert_eq!(max_abs_diff(&get("loaded.diffloom"), &x), 0.0);
    let comfy = latent_of(&load("comfy.latent").unwrap()[0]);
    assert_eq!(max_abs_diff(&comfy.samples.0, &get("loaded.comfy")), 0.0);
    let old = latent_of(&load("old.latent").unwrap()[0]).samples.0;
    assert_eq!(old.kind(), Kind::Float);
    assert_eq!(max_abs_diff(&old, &get("loaded.old")), 0.0);
    assert!(max_abs_diff(&old, &Tensor::zeros_like(&old)) > 1.0, "the old format is rescaled");
}

#[test]
fn load_image_output_and_mask_preview() {
    let d = Dir::new();
    let (input, output) = (d.join("input"), d.join("output"));
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(output.join("sub")).unwrap();
    d.png("output/sub/a.png", 5, 3, 1);
    d.png("input/a.png", 4, 4, 2);
    d.png("output/a.png", 6, 2, 3);
    let load = |name: &str| call_in(&image::LoadImageOutput, vec![("image", s(name))], &input, &output, &[]).0;
    let size = |name: &str| tensor(&load(name).unwrap()[0]).size();
    // A plain name is in the output folder (ComfyUI's frontend sends `name [output]`); annotations pick theirs.
    assert_eq!(size("a.png"), vec![1, 2, 6, 3]);
    assert_eq!(size("sub/a.png"), vec![1, 3, 5, 3]);
    assert_eq!(size("a.png [output]"), vec![1, 2, 6, 3]);
    assert_eq!(size("a.png [input]"), vec![1, 4, 4, 3]);
    // LoadImage's outputs: the same pixels as LoadImage of the same file, a 64×64 zero mask without alpha.
    let out = load("a.png").unwrap();
    let same = call_in(&image::LoadImage, vec![("image", s("a.png [output]"))], &input, &output, &[]).0.unwrap();
    assert_eq!(max_abs_diff(&tensor(&out[0]), &tensor(&same[0])), 0.0);
    assert_eq!(tensor(&out[1]).size(), vec![1, 64, 64]);
    let schema = image::LoadImageOutput.schema();
    assert_eq!((schema.category.as_str(), schema.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>()), ("image", vec!["IMAGE", "MASK"]));
    let folders = Folders { input_dir: input.clone(), ..Folders::default() };
    let loc = Locator { graph_dir: &input, folders: &folders, output_dir: &output };
    let token = |name: &str| image::LoadImageOutput.change_token(&loc, &Args::new(vec![("image".into(), s(name))])).unwrap().unwrap();
    assert_eq!(token("a.png"), token("a.png [output]"));
    assert_ne!(token("a.png"), token("a.png [input]"));
    let e = load("missing.png").unwrap_err();
    assert!(e.contains("image") && e.contains("missing.png"), "{e}");

    // MaskPreview: each mask as a grey PNG in the temporary folder (8-bit by truncation), no texts.
    let m = Tensor::from_slice(&[0.0f32, 0.5, 1.0, 0.25, 0.999, 1.0]).reshape([2, 1, 3]);
    let (r, ui) = call_in(&mask::MaskPreview, vec![("mask", msk(&m))], &input, &output, &[("prompt", "{}")]);
    assert!(r.unwrap().is_empty());
    assert!(mask::MaskPreview.schema().output_node);
    let shown = ui["images"].as_array().unwrap();
    assert_eq!(shown.len(), 2);
    assert_eq!(shown[0]["type"], "temp");
    let files = d.files("output/temp");
    assert_eq!(files, vec!["preview_00001_.png", "preview_00002_.png"]);
    let second = ::image::open(output.join("temp/preview_00002_.png")).unwrap().to_rgb8();
    assert_eq!(second.as_raw(), &vec![63u8, 63, 63, 254, 254, 254, 255, 255, 255]);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(output.join("temp/preview_00001_.png")).unwrap()));
    let reader = decoder.read_info().unwrap();
    assert!(reader.info().uncompressed_latin1_text.is_empty() && reader.info().utf8_text.is_empty());
    // A 2-D mask is one image.
    let (r, _) = call_in(&mask::MaskPreview, vec![("mask", msk(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu))))], &input, &output, &[]);
    r.unwrap();
    assert_eq!(d.files("output/temp").len(), 3);
    let e = call_in(&mask::MaskPreview, vec![("mask", msk(&Tensor::ones([3], (Kind::Float, Device::Cpu))))], &input, &output, &[]).0.unwrap_err();
    assert!(e.contains("mask"), "{e}");
}

#[test]
fn resize_pad_max_dimension_and_stitch() {
    // ResizeAndPadImage by hand: a 2×4 image into 4×4 is 4 wide, 2 high, one padding row above and below.
    let x = ramp(&[1, 2, 4, 1]).f_div_scalar(8.0).unwrap();
    let args = |w: i128, h: i128, color: &str, method: &str| {
        vec![("image", img(&x)), ("target_width", i(w)), ("target_height", i(h)), ("padding_color", s(color)), ("interpolation", s(method))]
    };
    let out = tensor(&run(&image::ResizeAndPadImage, args(4, 4, "white", "nearest-exact"))[0]);
    assert_eq!(out.size(), vec![1, 4, 4, 1]);
    let mut want = vec![1.0f32; 4];
    want.extend(vals(&x));
    want.extend([1.0; 4]);
    assert_eq!(vals(&out), want);
    // Black padding left and right; a side truncated to 0 leaves the canvas (ComfyUI's "area").
    let out = tensor(&run(&image::ResizeAndPadImage, args(6, 2, "black", "area"))[0]);
    assert_eq!(vals(&out.select(2, 0)), vec![0.0, 0.0]);
    assert_eq!(vals(&out.select(2, 5)), vec![0.0, 0.0]);
    let out = tensor(&run(&image::ResizeAndPadImage, args(1, 1, "white", "area"))[0]);
    assert_eq!(vals(&out), vec![1.0]);
    let spec = image::ResizeAndPadImage.schema();
    assert_eq!(text(&spec.input_spec("interpolation").unwrap().kind.default_value().unwrap()), "area");

    // ImageScaleToMaxDimension keeps ComfyUI's option list (bilinear twice, area first).
    let spec = image::ImageScaleToMaxDimension.schema();
    match &spec.input_spec("upscale_method").unwrap().kind {
        diffloom_core::InputKind::Combo { choices, default } => {
            assert_eq!(choices, &["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]);
            assert_eq!(default.as_deref(), Some("area"));
        }
        other => panic!("{other:?}"),
    }
    let max_dim = |t: &Tensor, size: i128| {
        tensor(&run(&image::ImageScaleToMaxDimension, vec![("image", img(t)), ("upscale_method", s("area")), ("largest_size", i(size))])[0]).size()
    };
    // Python's round: 3/8·4 = 1.5 → 2, 5/8·4 = 2.5 → 2.
    assert_eq!(max_dim(&Tensor::zeros([1, 3, 8, 3], (Kind::Float, Device::Cpu)), 4), vec![1, 2, 4, 3]);
    assert_eq!(max_dim(&Tensor::zeros([1, 8, 5, 3], (Kind::Float, Device::Cpu)), 4), vec![1, 4, 2, 3]);
    assert_eq!(max_dim(&Tensor::zeros([2, 5, 5, 3], (Kind::Float, Device::Cpu)), 7), vec![2, 7, 7, 3]);
    let e = err(&image::ImageScaleToMaxDimension, vec![("image", img(&x)), ("upscale_method", s("area")), ("largest_size", i(0))]);
    assert!(e.contains("largest_size"), "{e}");

    // ImageStitch without image2 is image1; by hand: batches padded with the last image, channels with
    // ones, an odd spacing made even, image2 first for "left".
    let a = Tensor::zeros([2, 2, 2, 3], (Kind::Float, Device::Cpu));
    let second = Tensor::full([1, 2, 1, 4], 0.5, (Kind::Float, Device::Cpu));
    let stitch = |dir: &str, m: bool, sp: i128, c: &str, two: Option<&Tensor>| {
        let mut args = vec![("image1", img(&a)), ("direction", s(dir)), ("match_image_size", b(m)), ("spacing_width", i(sp)), ("spacing_color", s(c))];
        if let Some(t) = two {
            args.push(("image2", img(t)));
        }
        tensor(&run(&image::ImageStitch, args)[0])
    };
    assert_eq!(max_abs_diff(&stitch("right", true, 0, "white", None), &a), 0.0);
    let out = stitch("left", false, 1, "red", Some(&second));
    assert_eq!(out.size(), vec![2, 2, 5, 4]);
    assert_eq!(vals(&out.get(1).get(0)), vec![0.5, 0.5, 0.5, 0.5, 1., 0., 0., 1., 1., 0., 0., 1., 0., 0., 0., 1., 0., 0., 0., 1.]);
    let spec = image::ImageStitch.schema();
    assert!(spec.input_spec("image2").unwrap().optional);
    assert!(boolean(&spec.input_spec("match_image_size").unwrap().kind.default_value().unwrap()));
    let thin = Tensor::zeros([1, 9, 1, 3], (Kind::Float, Device::Cpu));
    let e = err(
        &image::ImageStitch,
        vec![
            ("image1", img(&a)),
            ("direction", s("right")),
            ("match_image_size", b(true)),
            ("spacing_width", i(0)),
            ("spacing_color", s("white")),
            ("image2", img(&thin)),
        ],
    );
    assert!(e.contains("image2"), "{e}");
}

/// RebatchLatents as ComfyUI's nodes_rebatch.py: list in, list out; a batch is split off only once it
/// holds more than `batch_size` items, a latent of another size starts a new batch, batch indices
/// continue across the inputs, and all-ones masks are dropped while a real noise mask is kept.
#[test]
fn rebatch_latents_follows_comfyui() {
    let a = ramp(&[3, 4, 2, 2]);
    let b = ramp(&[2, 4, 2, 2]) + 100.0;
    let c = ramp(&[1, 4, 3, 3]);
    let half = Tensor::full([1, 1, 24, 24], 0.5, (Kind::Float, Device::Cpu));
    let list = |v: Vec<Option<Value>>| Some(Value::List(v.into_iter().map(Option::unwrap).collect()));
    let out = run(
        &rebatch::RebatchLatents,
        vec![("latents", list(vec![lat(&a, None, None), lat(&b, None, None), lat(&c, Some(&half), None)])), ("batch_size", list(vec![i(2)]))],
    );
    let [Value::List(items)] = &out[..] else { panic!("{out:?}") };
    let got: Vec<Latent> = items.iter().map(latent_of).collect();
    let all = Tensor::cat(&[&a, &b], 0);
    let expect = [(all.narrow(0, 0, 2), vec![0, 1]), (all.narrow(0, 2, 2), vec![2, 3]), (all.narrow(0, 4, 1), vec![4]), (c.shallow_clone(), vec![5])];
    assert_eq!(got.len(), expect.len());
    for (g, (samples, indices)) in got.iter().zip(&expect) {
        assert_eq!(max_abs_diff(&g.samples.0, samples), 0.0);
        assert_eq!(g.batch_index.as_ref(), Some(indices));
    }
    assert!(got[..3].iter().all(|l| l.noise_mask.is_none()));
    assert_eq!(got[3].noise_mask.as_ref().map(|m| max_abs_diff(&m.0, &half)), Some(0.0));
}

#[test]
fn rebatch_images_regroups_every_item() {
    let a = ramp(&[3, 8, 8, 3]);
    let b = ramp(&[2, 8, 8, 3]) * 2.0;
    let out = run(
        &rebatch::RebatchImages,
        vec![("images", Some(Value::List(vec![img(&a).unwrap(), img(&b).unwrap()]))), ("batch_size", Some(Value::List(vec![Value::Int(2)])))],
    );
    let [Value::List(items)] = &out[..] else { panic!("{out:?}") };
    let all = Tensor::cat(&[&a, &b], 0);
    assert_eq!(items.len(), 3);
    for (k, item) in items.iter().enumerate() {
        let t = tensor(item);
        let n = t.size()[0];
        assert_eq!(max_abs_diff(&t, &all.narrow(0, 2 * k as i64, n)), 0.0);
    }
    // Images of different sizes in one batch are an error naming the input.
    let odd = ramp(&[1, 4, 4, 3]);
    let e = err(
        &rebatch::RebatchImages,
        vec![("images", Some(Value::List(vec![img(&a).unwrap(), img(&odd).unwrap()]))), ("batch_size", Some(Value::List(vec![Value::Int(4)])))],
    );
    assert!(e.contains("images") && e.contains("different sizes"), "{e}");
}
