//! The sidecar's profile-guided code layout: a linker script that puts the
//! functions a profiled run executed next to each other, ahead of the rest
//! of `.text`.
//!
//! Why: the kernel maps a binary's code into a process in blocks (64 KiB of
//! fault-around, or a whole large folio of the page cache on kernels that map
//! those at once), so one executed function makes its neighbours resident
//! too. Laid out by crate, the ≈ 2 MB of code a sidecar runs is spread over
//! the binary's 12 MB of `.text` and most of it ends up resident; laid out
//! together, only that part is.
//!
//! Inputs (all text):
//! - the link map of the same sidecar build, written by lld with
//!   `--no-demangle` (`CHAPERONE_LINK_MAP`, see `crates/sidecar/build.rs`):
//!   which input section holds each function;
//! - the functions that ran: callgrind dumps (every function executed, also
//!   the ones run once at start) and the samples of a native run (`perf
//!   script -F ip,sym --no-demangle`: the CPU-specific variants callgrind's
//!   emulated CPU never selects, such as AVX-512 AES-GCM, the SHA extensions
//!   and the BMI2 curve code).
//!
//! Output: [`render`]'s script, which `crates/sidecar/build.rs` passes to
//! the linker. A function gets a pattern of its input section's name, with
//! the ThinLTO promotion suffix (`.llvm.<hash of its module>`, which changes
//! whenever that module's code does) as a wildcard, so the script outlives
//! most edits; assembly objects (one `.text` per object) get a pattern of
//! their object's name without the build-path hash `cc` prefixes it with.

use std::collections::{BTreeSet, HashMap};

/// Errors of reading a link map.
#[derive(Debug, thiserror::Error)]
pub enum HotTextError {
    /// The map is not lld's (`VMA LMA Size Align Out In Symbol` header).
    #[error(
        "not an lld link map (its first line is {0:?}); build the sidecar with lld, the toolchain's default linker"
    )]
    NotLldMap(String),
    /// The map names functions demangled: the link lacked `--no-demangle`.
    #[error("the link map's symbols are demangled (e.g. {0:?}); link with --no-demangle")]
    Demangled(String),
}

/// Where a function's code is, from the link map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSection {
    /// The input file: an object, or `archive(member)`.
    pub file: String,
    /// The section's name in that file (`.text.<symbol>`, or `.text`).
    pub section: String,
}

/// The code sections of a link map, by the symbols they define.
#[derive(Debug, Default)]
pub struct LinkMap {
    sections: Vec<InputSection>,
    by_symbol: HashMap<String, usize>,
}

/// Output sections whose input sections are code to lay out.
const CODE_OUTPUT_SECTIONS: &[&str] = &[".text", ".text.profiled"];

impl LinkMap {
    /// Reads lld's `-Map` output: output sections at column 0 of the
    /// name field, their input sections indented by 8, symbols by 16.
    pub fn parse(map: &str) -> Result<Self, HotTextError> {
        let mut lines = map.lines();
        let header = lines.next().unwrap_or_default();
        let columns: Vec<&str> = header.split_whitespace().collect();
        if columns != ["VMA", "LMA", "Size", "Align", "Out", "In", "Symbol"] {
            return Err(HotTextError::NotLldMap(header.to_owned()));
        }
        let mut parsed = Self::default();
        let mut in_code = false;
        let mut current: Option<usize> = None;
        for line in lines {
            let Some(name) = name_field(line) else {
                continue;
            };
            let indent = name.len() - name.trim_start_matches(' ').len();
            let name = name.trim();
            match indent {
                0 => {
                    in_code = CODE_OUTPUT_SECTIONS.contains(&name);
                    current = None;
                }
                8 => {
                    current = None;
                    if !in_code {
                        continue;
                    }
                    // `file:(section)`; the file may contain `:` itself.
                    let Some((file, section)) = name
                        .strip_suffix(')')
                        .and_then(|rest| rest.rsplit_once(":("))
                    else {
                        continue;
                    };
                    parsed.sections.push(InputSection {
                        file: file.to_owned(),
                        section: section.to_owned(),
                    });
                    current = Some(parsed.sections.len() - 1);
                }
                16 => {
                    if let Some(index) = current {
                        if name.contains("::") {
                            return Err(HotTextError::Demangled(name.to_owned()));
                        }
                        parsed.by_symbol.entry(name.to_owned()).or_insert(index);
                    }
                }
                _ => {}
            }
        }
        Ok(parsed)
    }

    /// The input section defining `symbol`, if it is code of this link.
    pub fn section_of(&self, symbol: &str) -> Option<&InputSection> {
        self.by_symbol.get(symbol).map(|&i| &self.sections[i])
    }
}

/// The text after a map line's four numeric columns (and one space), or
/// `None` for a line that is not an entry.
fn name_field(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..4 {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ')?;
        if !rest[..end].bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        rest = &rest[end..];
    }
    rest.strip_prefix(' ')
}

/// The functions a callgrind dump saw run (`fn=` and `cfn=` entries, name
/// compression resolved; callgrind's `'N` recursion-depth suffix removed).
pub fn callgrind_functions(dump: &str) -> BTreeSet<String> {
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut functions = BTreeSet::new();
    for line in dump.lines() {
        let Some(spec) = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))
        else {
            continue;
        };
        // `(id) name` defines a compressed name, `(id)` uses it.
        let name = match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, "")) => names.get(id).copied(),
            Some((id, name)) => {
                let name = name.trim_start();
                names.insert(id, name);
                Some(name)
            }
            None => Some(spec),
        };
        if let Some(name) = name {
            functions.insert(without_recursion_suffix(name).to_owned());
        }
    }
    functions
}

/// `name` without callgrind's `'N` suffix (the Nth recursion level).
fn without_recursion_suffix(name: &str) -> &str {
    match name.rsplit_once('\'') {
        Some((base, depth)) if !depth.is_empty() && depth.bytes().all(|b| b.is_ascii_digit()) => {
            base
        }
        _ => name,
    }
}

/// The functions `perf script -F ip,sym --no-demangle` printed samples in
/// (each line an address and a symbol; `[unknown]` skipped).
pub fn perf_functions(script: &str) -> BTreeSet<String> {
    script
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let ip = fields.next()?;
            let name = fields.next()?;
            (ip.bytes().all(|b| b.is_ascii_hexdigit()) && !name.starts_with('['))
                .then(|| name.to_owned())
        })
        .collect()
}

/// The linker-script patterns laying out `functions`: input-section name
/// patterns, and object patterns for objects with one `.text` each.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Patterns of function sections (any file).
    pub sections: BTreeSet<String>,
    /// File patterns of objects whose whole `.text` goes first.
    pub objects: BTreeSet<String>,
    /// Functions found in the map.
    pub found: usize,
    /// Functions not in this binary's code (libc, the kernel, the vDSO).
    pub not_in_binary: usize,
}

/// The layout of the `functions` that ran, by where `map` says they are.
pub fn layout<'a>(map: &LinkMap, functions: impl IntoIterator<Item = &'a str>) -> Layout {
    let mut layout = Layout::default();
    for function in functions {
        let Some(input) = map.section_of(function) else {
            layout.not_in_binary += 1;
            continue;
        };
        layout.found += 1;
        if input.section == ".text" {
            layout.objects.insert(object_pattern(&input.file));
        } else {
            layout.sections.insert(section_pattern(&input.section));
        }
    }
    layout
}

/// A section name with ThinLTO's `.llvm.<digits>` promotion suffix made a
/// wildcard.
fn section_pattern(section: &str) -> String {
    match section.rsplit_once(".llvm.") {
        Some((base, digits))
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{base}.llvm.*")
        }
        _ => section.to_owned(),
    }
}

/// A pattern of an input file by its object's own name: the member of
/// `archive(member)`, or the file's last path component, without the
/// 16-hex-digit hash of its source path that `cc` puts in front (a
/// digit class in its place).
fn object_pattern(file: &str) -> String {
    let object = match file.strip_suffix(')').and_then(|f| f.rsplit_once('(')) {
        Some((_, member)) => member,
        None => file.rsplit('/').next().unwrap_or(file),
    };
    match object.split_once('-') {
        // The hash's last digit stays in the pattern, so that `sha256-x86_64.o`
        // does not also take `<hash>-aesni-sha256-x86_64.o`.
        Some((hash, rest)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            format!("*[0-9a-f]-{rest}")
        }
        _ => format!("*{object}"),
    }
}

/// The linker script of `layout`, with `provenance` (how and from what it
/// was made) in its header comment.
pub fn render(layout: &Layout, provenance: &str) -> String {
    let mut script = String::new();
    script.push_str("/*\n");
    script.push_str(" * chaperone-sidecar's code layout: the functions a profiled run executed,\n");
    script.push_str(" * placed together ahead of the rest of .text so that a running sidecar's\n");
    script.push_str(" * resident code is those, not most of the binary (bench/src/hot_text.rs).\n");
    script.push_str(" * Generated by `make hot-text`; do not edit. A function added or renamed\n");
    script.push_str(" * since stays where the linker puts it by default: a stale script costs\n");
    script.push_str(" * memory, never correctness.\n");
    for line in provenance.lines() {
        script.push_str(" * ");
        script.push_str(line);
        script.push('\n');
    }
    script.push_str(" */\n");
    script.push_str("SECTIONS\n{\n  .text.profiled :\n  {\n");
    for object in &layout.objects {
        script.push_str("    ");
        script.push_str(object);
        script.push_str("(.text)\n");
    }
    script.push_str("    *(\n");
    for section in &layout.sections {
        script.push_str("      ");
        script.push_str(section);
        script.push('\n');
    }
    script.push_str("    )\n  }\n}\nINSERT BEFORE .text;\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "             VMA              LMA     Size Align Out     In      Symbol
             2e0              2e0       1c     1 .interp
             2e0              2e0       1c     1         <internal>:(.interp)
            6000             6000   181a40  4096 .rodata
           39ee8            39ee8      150     4         /t/deps/a.rcgu.o:(.rodata._ZN4json6string17h7c47952c74a207e7E)
          38ec00           38ec00   c32fb8    64 .text
          4f61a0           4f61a0      a81    16         /t/deps/a.rcgu.o:(.text._ZN4json6string17h7c47952c74a207e7E)
          4f61a0           4f61a0      a81     1                 _ZN4json6string17h7c47952c74a207e7E
          4f6c30           4f6c30      84d    16         /t/deps/b.rcgu.o:(.text._ZN4json5value17h1111111111111111E.llvm.10792370647132838597)
          4f6c30           4f6c30      84d     1                 _ZN4json5value17h1111111111111111E.llvm.10792370647132838597
          4f7000           4f7000      100    16         /t/deps/b.rcgu.o:(.text.unlikely._ZN4json4cold17h2222222222222222E)
          4f7000           4f7000      100     1                 _ZN4json4cold17h2222222222222222E
          4f7000           4f7000      100     1                 _ZN4json9cold_alias17h3333333333333333E
          f53b80           f53b80     4000     64         /t/rustcX/libaws_lc_sys-c1f6.rlib(6cca901d1d9807b8-sha256-x86_64.o):(.text)
          f53b80           f53b80      ef8     1                 aws_lc_0_47_0_sha256_block_data_order_avx
          f54b80           f54b80      ef8     1                 aws_lc_0_47_0_sha256_block_data_order_hw
         1000000          1000000       10     8 .data
         1000000          1000000       10     8         /t/deps/a.rcgu.o:(.data.x)
         1000000          1000000       10     1                 data_symbol
";

    #[test]
    fn the_map_gives_each_code_symbol_its_input_section() {
        let map = LinkMap::parse(MAP).unwrap();
        let string = map
            .section_of("_ZN4json6string17h7c47952c74a207e7E")
            .unwrap();
        assert_eq!(string.file, "/t/deps/a.rcgu.o");
        assert_eq!(string.section, ".text._ZN4json6string17h7c47952c74a207e7E");
        // An alias lives in its target's section.
        assert_eq!(
            map.section_of("_ZN4json9cold_alias17h3333333333333333E")
                .unwrap()
                .section,
            ".text.unlikely._ZN4json4cold17h2222222222222222E"
        );
        let asm = map
            .section_of("aws_lc_0_47_0_sha256_block_data_order_hw")
            .unwrap();
        assert_eq!(asm.section, ".text");
        assert_eq!(
            asm.file,
            "/t/rustcX/libaws_lc_sys-c1f6.rlib(6cca901d1d9807b8-sha256-x86_64.o)"
        );
        // Data is not code.
        assert!(map.section_of("data_symbol").is_none());
    }

    #[test]
    fn other_maps_are_refused_by_name() {
        let gnu = "Archive member included to satisfy reference by file (symbol)\n";
        assert!(matches!(
            LinkMap::parse(gnu),
            Err(HotTextError::NotLldMap(_))
        ));
        let demangled = MAP.replace(
            "                 _ZN4json6string17h7c47952c74a207e7E",
            "                 json::string::h7c47952c74a207e7",
        );
        let error = LinkMap::parse(&demangled).unwrap_err();
        assert!(error.to_string().contains("--no-demangle"), "{error}");
    }

    #[test]
    fn callgrind_names_are_resolved_and_their_recursion_depth_dropped() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n\
                    ob=(1) /bin/sidecar\nfl=(1) ???\nfn=(1) main\n3 10\n\
                    cfn=(2) helper'2\ncalls=1 0\n3 5\n\
                    fn=(3) other\n1 1\ncfn=(1)\ncalls=1 0\n1 2\n\
                    fn=(2)\n1 4\nfn=plain\n1 1\n";
        let functions = callgrind_functions(dump);
        let expected: BTreeSet<String> = ["main", "helper", "other", "plain"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(functions, expected);
        assert_eq!(without_recursion_suffix("a'b"), "a'b");
    }

    #[test]
    fn perf_samples_skip_unknown_and_blank_lines() {
        let script = " 4f61a0 aws_lc_0_47_0_sha256_block_data_order_hw\n 7f00 [unknown]\n\n \
                      ffffffff8225275b _raw_spin_unlock\n 4f61a1 main\n 4f61a2 main\n";
        let functions: Vec<String> = perf_functions(script).into_iter().collect();
        assert_eq!(
            functions,
            [
                "_raw_spin_unlock",
                "aws_lc_0_47_0_sha256_block_data_order_hw",
                "main"
            ]
        );
    }

    #[test]
    fn patterns_outlive_thinlto_suffixes_and_build_paths() {
        let map = LinkMap::parse(MAP).unwrap();
        let layout = layout(
            &map,
            [
                "_ZN4json6string17h7c47952c74a207e7E",
                "_ZN4json5value17h1111111111111111E.llvm.10792370647132838597",
                "_ZN4json9cold_alias17h3333333333333333E",
                "aws_lc_0_47_0_sha256_block_data_order_avx",
                "aws_lc_0_47_0_sha256_block_data_order_hw",
                "malloc",
            ],
        );
        let sections: Vec<&str> = layout.sections.iter().map(String::as_str).collect();
        assert_eq!(
            sections,
            [
                ".text._ZN4json5value17h1111111111111111E.llvm.*",
                ".text._ZN4json6string17h7c47952c74a207e7E",
                ".text.unlikely._ZN4json4cold17h2222222222222222E",
            ]
        );
        let objects: Vec<&str> = layout.objects.iter().map(String::as_str).collect();
        assert_eq!(objects, ["*[0-9a-f]-sha256-x86_64.o"]);
        assert_eq!((layout.found, layout.not_in_binary), (5, 1));
        assert_eq!(object_pattern("/x/plain.o"), "*plain.o");
        assert_eq!(object_pattern("/x/lib.a(nohash-a.o)"), "*nohash-a.o");
        assert_eq!(section_pattern(".text.f.llvm.x"), ".text.f.llvm.x");
    }

    #[test]
    fn the_script_inserts_one_output_section_before_text() {
        let map = LinkMap::parse(MAP).unwrap();
        let layout = layout(
            &map,
            [
                "_ZN4json6string17h7c47952c74a207e7E",
                "aws_lc_0_47_0_sha256_block_data_order_hw",
            ],
        );
        let script = render(&layout, "commit abc\nrun xyz");
        assert!(
            script.contains(" * commit abc\n * run xyz\n */\n"),
            "{script}"
        );
        let body = script.split_once("*/\n").unwrap().1;
        assert_eq!(
            body,
            "SECTIONS\n{\n  .text.profiled :\n  {\n    *[0-9a-f]-sha256-x86_64.o(.text)\n    *(\n      \
             .text._ZN4json6string17h7c47952c74a207e7E\n    )\n  }\n}\nINSERT BEFORE .text;\n"
        );
    }
}
