//! Property-based tests (proptest) of what a hostile client controls byte for byte: request
//! parsing, the image header probe and the decoders, on random and mutated inputs. Properties:
//! never a panic; errors are client errors (4xx) with a stable type; and memory stays bounded: a
//! counting allocator (this test binary's global allocator, counting per thread) checks that
//! parsing allocates at most a few times the body, and that decoding allocates no more than
//! `imaging::decode_memory` says from the header (what admission reserves before decoding).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use qwen_edit::imaging::{self, OutputFormat, RgbImage};
use qwen_edit::service::schema::{self, Limits};

/// The system allocator, counting the bytes live and their peak on each thread.
struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn account(delta: i64) {
    // `try_with`: thread-local storage may be gone while a thread exits.
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as i64);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as i64);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as i64 - layout.size() as i64);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it had allocated at once (this thread).
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get) - base;
    (r, peak.max(0) as u64)
}

fn limits() -> Limits {
    Limits {
        default_steps: 8,
        default_true_cfg_scale: 4.0,
        max_images: 4,
        max_prompt_chars: 4096,
        max_output_side: 2048,
        max_steps: 100,
    }
}

fn check_parse(body: &[u8]) -> Result<(), TestCaseError> {
    let (r, peak) = peak_of(|| schema::parse(body, &limits(), || 7));
    if let Err(e) = &r {
        prop_assert!(e.status.is_client_error(), "{} for {:?}", e, String::from_utf8_lossy(&body[..body.len().min(200)]));
        prop_assert!(["invalid_json", "validation_error", "invalid_url"].contains(&e.error_type), "{}", e.error_type);
    }
    prop_assert!(peak <= 3 * body.len() as u64 + (64 << 10), "parsing {} bytes allocated {peak} at once", body.len());
    Ok(())
}

/// A valid request with its images, for mutation.
fn valid_body() -> impl Strategy<Value = String> {
    (
        "[a-z ]{0,40}",
        prop::option::of(0u64..u64::MAX),
        prop::option::of(-5i64..200),
        prop::option::of(0.0f64..30.0),
        prop::collection::vec("[A-Za-z0-9+/=]{0,12}", 0..20),
    )
        .prop_map(|(prompt, seed, steps, cfg, images)| {
            let list: Vec<serde_json::Value> = images.iter().map(|b| serde_json::json!({"image_base64": b})).collect();
            serde_json::json!({"input": {"prompt": prompt, "seed": seed, "num_inference_steps": steps, "true_cfg_scale": cfg,
                                         "images": list, "width": steps.map(|s| s * 16)}})
            .to_string()
        })
}

/// Random JSON values of some depth (any shape a client could send as `input`).
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("prompt".to_string()),
                    Just("images".to_string()),
                    Just("image_base64".to_string()),
                    Just("image_url".to_string()),
                    Just("width".to_string()),
                    Just("seed".to_string()),
                    "[a-z_]{1,10}"
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mutations: flip, insert, delete or overwrite bytes; cut the tail.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, op, value) in edits {
        if bytes.is_empty() {
            bytes.push(value);
            continue;
        }
        let i = at % bytes.len();
        match op % 4 {
            0 => bytes[i] ^= value | 1,
            1 => bytes.insert(i, value),
            2 => {
                bytes.remove(i);
            }
            _ => bytes[i] = value,
        }
    }
    if let Some(c) = cut {
        let keep = c % (bytes.len() + 1);
        bytes.truncate(keep);
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parsing_random_bytes_never_panics(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_parse(&body)?;
    }

    #[test]
    fn parsing_mutated_requests_never_panics(body in valid_body(), e in edits(), cut in prop::option::of(any::<usize>())) {
        check_parse(&mutate(body.into_bytes(), &e, cut))?;
    }

    #[test]
    fn parsing_any_json_input_never_panics(input in json_value(), wrap in any::<bool>()) {
        let body = if wrap { serde_json::json!({"input": input}) } else { input };
        check_parse(body.to_string().as_bytes())?;
    }
}

/// Small valid images of each format the server takes, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let img = RgbImage::from_fn(37, 23, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 3) as u8]));
    let mut out = vec![
        imaging::encode(&img, OutputFormat::Png).unwrap(),
        imaging::encode(&img, OutputFormat::Jpeg { quality: 80 }).unwrap(),
        imaging::encode(&img, OutputFormat::Webp).unwrap(),
    ];
    // A 16-bit RGBA PNG (the most memory per pixel).
    let rgba16 =
        image::ImageBuffer::<image::Rgba<u16>, _>::from_fn(9, 5, |x, y| image::Rgba([x as u16 * 900, y as u16 * 77, 5, 65535]));
    let mut png16 = Vec::new();
    image::DynamicImage::ImageRgba16(rgba16).write_to(&mut std::io::Cursor::new(&mut png16), image::ImageFormat::Png).unwrap();
    out.push(png16);
    out
}

/// Decoding never panics, obeys the limits, and allocates at most what the header promised.
fn check_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    let limits = imaging::Limits { max_width: 512, max_height: 512, max_pixels: 64 * 1024 };
    let probed = imaging::probe(bytes);
    let (decoded, peak) = peak_of(|| imaging::decode(bytes, &limits));
    match (&probed, &decoded) {
        (Ok(info), Ok(img)) => {
            prop_assert!(info.width > 0 && info.height > 0);
            prop_assert!(
                img.width() <= 512 && img.height() <= 512 && u64::from(img.width()) * u64::from(img.height()) <= 64 * 1024
            );
            let promised = imaging::decode_memory(bytes, info).saturating_add(4 * bytes.len() as u64);
            prop_assert!(
                peak <= promised,
                "decoding {}x{} {:?} allocated {peak} > {promised}",
                info.width,
                info.height,
                info.format
            );
        }
        (Err(_), Ok(_)) => prop_assert!(false, "decoded what the probe refused"),
        (Ok(info), Err(_)) => {
            let promised = imaging::decode_memory(bytes, info).saturating_add(4 * bytes.len() as u64);
            prop_assert!(peak <= promised, "a failed decode allocated {peak} > {promised}");
        }
        (Err(_), Err(_)) => prop_assert!(peak <= 4 * bytes.len() as u64 + (1 << 20), "refused, yet allocated {peak}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn the_header_probe_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(info) = imaging::probe(&bytes) {
            prop_assert!(info.width > 0 && info.height > 0);
        }
    }

    #[test]
    fn decoding_mutated_images_never_panics_and_stays_in_its_budget(
        which in 0usize..4, e in edits(), cut in prop::option::of(any::<usize>())
    ) {
        let bytes = mutate(seeds()[which].clone(), &e, cut);
        check_decode(&bytes)?;
    }

    #[test]
    fn decoding_random_bytes_behind_a_real_magic_never_panics(
        which in 0usize..4, tail in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        let head = &seeds()[which][..16];
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(&tail);
        check_decode(&bytes)?;
    }
}

/// Headers that claim huge sizes are refused before anything is allocated for their pixels.
#[test]
fn headers_claiming_huge_images_allocate_nothing_for_pixels() {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    png.extend_from_slice(&60000u32.to_be_bytes());
    png.extend_from_slice(&60000u32.to_be_bytes());
    png.extend_from_slice(&[16, 6, 0, 0, 0, 0, 0, 0, 0]);
    let (r, peak) = peak_of(|| imaging::decode(&png, &imaging::Limits::default()));
    assert!(matches!(r, Err(imaging::Error::TooLarge { .. })), "{r:?}");
    assert!(peak < 1 << 16, "{peak} bytes allocated for a refused header");
}
