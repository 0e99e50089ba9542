//! Build script.
//!
//! Always: compiles every `kernels/*.cu` as host C++ against the runtime in `kernels/interp/`
//! (the interpreted mode, `Device::Interp`). Needs only a C++17 compiler.
//!
//! With feature `cuda`: compiles every `kernels/*.cu` with nvcc into a fatbin (sm_80 and sm_90
//! SASS plus compute_90 PTX) embedded by `src/kernels/cuda.rs`, prints ptxas's resource report
//! and fails on any register spill. Needs nvcc, not libclang.
//!
//! With feature `check-bindings` (CI): also runs bindgen over `kernels/include/params.h`, failing
//! if the checked-in mirror `src/kernels/params.rs` is stale (set CONTRA_UPDATE_BINDINGS=1 to
//! rewrite it). Plain builds need neither nvcc nor libclang.

use std::path::PathBuf;

fn kernel_sources() -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    sources
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=CONTRA_UPDATE_BINDINGS");
    let sources = kernel_sources();
    build_interp(&sources);
    #[cfg(feature = "cuda")]
    cuda::build(&sources);
}

/// The interpreted mode: kernels as host C++, every CUDA thread a fiber on a CPU worker.
fn build_interp(sources: &[PathBuf]) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include("kernels")
        .opt_level(2)
        .flag_if_supported("-pthread")
        .flag_if_supported("-fno-strict-aliasing")
        .warnings(false)
        .file("kernels/interp/runtime.cpp");
    for source in sources {
        // The .cu sources are plain C++ once the interp header stands in for the CUDA built-ins.
        build.file(source);
    }
    build.flag("-x").flag("c++");
    build.compile("contra_interp");
    println!("cargo:rustc-link-lib=pthread");
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Where nvcc lives: CUDA_HOME, CUDA_PATH, PATH, then the pip wheel `nvidia-cuda-nvcc`.
    fn find_nvcc() -> Option<PathBuf> {
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(root) = std::env::var_os(var) {
                let nvcc = Path::new(&root).join("bin/nvcc");
                if nvcc.is_file() {
                    return Some(nvcc);
                }
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("nvcc").is_file() {
                    return Some(dir.join("nvcc"));
                }
            }
        }
        for python in ["python3", "python"] {
            let out = Command::new(python)
                .args(["-c", "import nvidia.cu13 as m; print(list(m.__path__)[0])"])
                .output();
            if let Ok(out) = out {
                let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if root.join("bin/nvcc").is_file() {
                    return Some(root.join("bin/nvcc"));
                }
            }
        }
        None
    }

    pub fn build(sources: &[PathBuf]) {
        let nvcc = find_nvcc().unwrap_or_else(|| {
            panic!(
                "feature `cuda`: nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH and the pip \
                 package nvidia-cuda-nvcc). Install CUDA 13.0, or: pip install \"nvidia-cuda-nvcc==13.0.*\" \
                 \"nvidia-cuda-runtime==13.0.*\" \"nvidia-cuda-crt==13.0.*\" \"nvidia-nvvm==13.0.*\" \
                 \"nvidia-cuda-cccl==13.0.*\""
            )
        });
        let root = nvcc
            .parent()
            .and_then(Path::parent)
            .expect("nvcc in <root>/bin")
            .to_path_buf();
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let mut spills = Vec::new();
        let mut names = Vec::new();
        for source in sources {
            let stem = source
                .file_stem()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let fatbin = out_dir.join(format!("{stem}.fatbin"));
            let mut cmd = Command::new(&nvcc);
            cmd.arg("--fatbin")
                .args(["-gencode", "arch=compute_80,code=sm_80"])
                .args(["-gencode", "arch=compute_90,code=sm_90"])
                .args(["-gencode", "arch=compute_90,code=compute_90"])
                .args(["-O3", "-std=c++17", "-Xptxas", "-v", "-Ikernels"])
                .arg(format!("-I{}", root.join("include").display()))
                .arg("-o")
                .arg(&fatbin)
                .arg(source);
            let output = cmd
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            let report = String::from_utf8_lossy(&output.stderr).into_owned();
            if !output.status.success() {
                panic!(
                    "nvcc failed on {}\ncommand: {:?}\n{}{}",
                    source.display(),
                    cmd,
                    String::from_utf8_lossy(&output.stdout),
                    report
                );
            }
            // ptxas -v: "Compiling entry function 'k' for 'sm_90'" then "N bytes spill stores".
            let mut current = String::new();
            for line in report.lines() {
                if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                    current = rest
                        .replace("' for '", " ")
                        .trim_end_matches('\'')
                        .to_string();
                }
                if line.contains("registers") || line.contains("spill") {
                    println!(
                        "cargo:warning=ptxas {current}: {}",
                        line.trim().trim_start_matches("ptxas info    : ")
                    );
                }
                if let Some(n) = line
                    .split(" bytes spill stores")
                    .next()
                    .and_then(|s| s.split_whitespace().last())
                {
                    if line.contains("spill stores") && n.parse::<u64>().unwrap_or(0) > 0 {
                        spills.push(format!("{current}: {}", line.trim()));
                    }
                }
            }
            let entries = fatbin_entries(&std::fs::read(&fatbin).expect("read the fatbin"));
            for wanted in ["sm_80 SASS", "sm_90 SASS", "compute_90 PTX"] {
                if !entries.iter().any(|e| e == wanted) {
                    panic!(
                        "{}: fatbin lacks {wanted} (has {entries:?})",
                        fatbin.display()
                    );
                }
            }
            println!("cargo:warning=fatbin {stem}: {}", entries.join(", "));
            names.push(stem);
        }
        if !spills.is_empty() {
            panic!("register spills (not allowed):\n{}", spills.join("\n"));
        }
        // One include_bytes! per module for src/kernels/cuda.rs.
        let table: String = names
            .iter()
            .map(|n| {
                format!(
                    "    (\"{n}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.fatbin\"))),\n"
                )
            })
            .collect();
        std::fs::write(out_dir.join("fatbins.rs"), format!("&[\n{table}]\n"))
            .expect("write fatbins.rs");
        #[cfg(feature = "check-bindings")]
        check_bindings(&out_dir);
    }

    /// The code objects in a fatbin: its header (magic 0xBA55ED50, u16 version, u16 header size,
    /// u64 payload size) is followed by entries whose header starts with u16 kind (1 PTX, 2 ELF),
    /// u16 version, u32 header size, u64 payload size, and holds the SM number at byte 28.
    fn fatbin_entries(bytes: &[u8]) -> Vec<String> {
        let u16_at = |o: usize| {
            bytes
                .get(o..o + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        };
        let u32_at = |o: usize| {
            bytes
                .get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let u64_at = |o: usize| {
            bytes
                .get(o..o + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        };
        let mut entries = Vec::new();
        if u32_at(0) != Some(0xBA55_ED50) {
            return entries;
        }
        let (Some(start), Some(payload)) = (u16_at(6), u64_at(8)) else {
            return entries;
        };
        let mut offset = start;
        while offset < start + payload {
            let (Some(kind), Some(header), Some(size), Some(arch)) = (
                u16_at(offset),
                u32_at(offset + 4),
                u64_at(offset + 8),
                u32_at(offset + 28),
            ) else {
                break;
            };
            entries.push(match kind {
                1 => format!("compute_{arch} PTX"),
                2 => format!("sm_{arch} SASS"),
                _ => format!("kind {kind} for {arch}"),
            });
            offset += header + size;
        }
        entries
    }

    /// bindgen over params.h must equal the checked-in src/kernels/params.rs.
    #[cfg(feature = "check-bindings")]
    fn check_bindings(out_dir: &Path) {
        let generated = bindgen::Builder::default()
            .header("kernels/include/params.h")
            .allowlist_type("Contra.*")
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(true)
            .generate()
            .expect("bindgen over kernels/include/params.h (needs libclang)")
            .to_string();
        let text = format!(
            "// Generated by bindgen from kernels/include/params.h; do not edit.\n\
             // `cargo build --features check-bindings` fails when this copy is stale; rebuild\n\
             // with CONTRA_UPDATE_BINDINGS=1 to rewrite it.\n{generated}"
        );
        std::fs::write(out_dir.join("params.rs"), &text).expect("write params.rs");
        let checked_in = Path::new("src/kernels/params.rs");
        let current = std::fs::read_to_string(checked_in).unwrap_or_default();
        if current != text {
            if std::env::var_os("CONTRA_UPDATE_BINDINGS").is_some() {
                std::fs::write(checked_in, &text).expect("update src/kernels/params.rs");
            } else {
                panic!(
                    "src/kernels/params.rs is stale against kernels/include/params.h; rebuild with \
                     CONTRA_UPDATE_BINDINGS=1 cargo build --features check-bindings"
                );
            }
        }
    }
}
