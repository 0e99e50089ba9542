use contra::data::{digits, parse_digits_csv};

#[test]
fn embedded_digits_have_every_class() {
    let d = digits().unwrap();
    assert_eq!(d.len(), 1797);
    assert_eq!(d.images.len(), 1797 * 64);
    let mut per_class = [0usize; 10];
    for &l in &d.labels {
        per_class[l as usize] += 1;
    }
    assert!(
        per_class.iter().all(|&c| (170..=190).contains(&c)),
        "{per_class:?}"
    );
    assert!(d.images.iter().all(|&v| (0.0..=1.0).contains(&v)));
    // Not a blank image set: the mean intensity of a digit is well above zero.
    let mean: f32 = d.image(0).iter().sum::<f32>() / 64.0;
    assert!(mean > 0.1, "{mean}");
}

#[test]
fn bad_csv_lines_are_reported_with_their_number() {
    let row = |label: &str| format!("{}{label}\n", "0,".repeat(64));
    let text = format!("{}{}", row("3"), row("12"));
    let err = parse_digits_csv(&text).unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("label 12"), "{err}");
    let err = parse_digits_csv("1,2,3\n").unwrap_err().to_string();
    assert!(err.contains("3 fields"), "{err}");
}
