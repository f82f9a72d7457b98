//! Converts a llama.cpp GGUF (Llama architecture) into a Hugging Face directory.
//!
//! `cargo run --release --example convert -- MODEL.gguf OUT_DIR`

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: convert MODEL.gguf OUT_DIR");
        std::process::exit(2);
    }
    if let Err(e) = kvsieve::convert::convert_gguf(args[0].as_ref(), args[1].as_ref()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
