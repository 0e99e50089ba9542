#[test]
fn f64_fixtures() {
    let cases = contra::fixtures::load_cases(std::path::Path::new("/tmp/pw_fix")).unwrap();
    for c in &cases {
        let r = contra::fixtures::run_case(c, contra::Device::Cpu, contra::fixtures::Precision::F64);
        println!("{}", r.line());
        assert!(r.passed());
    }
}
