//! The `memconv` op language, comma separated: `KIND@GPA+SIZE[=BYTE]` for
//! conversions, memory and the test device; `cfg-KIND@DEV:REG[=DWORD]` for
//! a dword of a function's configuration space; `mmio-KIND@GPA[=DWORD]` for
//! one dword access anywhere in the guest's physical address space.
//! Only syntax is checked: GPAs and sizes pass through unchanged so tests can
//! feed the VMM bad conversions (and bad BAR addresses).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A doorbell round trip that converts nothing (benchmark baseline).
    Nop,
    Shared,
    Private,
    /// Fill `gpa..gpa+size` with `value` from inside the guest.
    Write,
    /// Spin until the byte at `gpa` equals `value` (a device writes it by
    /// DMA); lets a test look at the VM between two steps.
    Wait,
    /// The test device fills the range with the byte by DMA.
    DmaWrite,
    /// The test device reads the range by DMA and compares it with the byte.
    DmaRead,
    /// The guest compares the range with the byte itself.
    Check,
    /// The guest stores the byte over `size` bytes of the test device's
    /// BAR0 at offset `gpa`.
    BarWrite,
    /// The guest compares `size` bytes of BAR0 at offset `gpa` with the byte.
    BarCheck,
    /// Reads configuration dword `size` (a byte offset) of bus 0 device
    /// `gpa` through ports 0xCF8/0xCFC and prints it.
    CfgRead,
    /// Writes `value` there.
    CfgWrite,
    /// Reads it and compares with `value` (prints what it read).
    CfgCheck,
    /// One dword load from guest physical address `gpa`, printed.
    MmioRead,
    /// One dword store of `value` at `gpa`.
    MmioWrite,
    /// One dword load compared with `value` (prints what it read).
    MmioCheck,
}

/// Every op's syntax, for `--help` and error messages.
pub const SYNTAX: &str = "\
nop@GPA+SIZE              doorbell round trip, converts nothing
shared@GPA+SIZE           convert to shared through the doorbell
private@GPA+SIZE          convert to private through the doorbell
write@GPA+SIZE=BYTE       the guest fills RAM (GPA >= 16 MiB)
check@GPA+SIZE=BYTE       the guest compares RAM with BYTE
wait@GPA+SIZE=BYTE        spin until the byte at GPA is BYTE (a device writes it)
dma-write@GPA+SIZE=BYTE   the test device fills the range by DMA
dma-read@GPA+SIZE=BYTE    the test device reads the range and compares
bar-write@OFF+SIZE=BYTE   the guest stores bytes at BAR0+OFF of the test device
bar-check@OFF+SIZE=BYTE   the guest compares bytes at BAR0+OFF
cfg-read@DEV:REG          read config dword REG (byte offset, 0..=0xfc, 4-aligned)
                          of bus 0 device DEV (0..=31), print it
cfg-write@DEV:REG=DWORD   write the dword (moves BARs, flips the command register)
cfg-check@DEV:REG=DWORD   read it and compare with DWORD
mmio-read@GPA             one dword load at any GPA in the identity map, printed
mmio-write@GPA=DWORD      one dword store there
mmio-check@GPA=DWORD      one dword load compared with DWORD
GPA, OFF, DEV, REG, BYTE, DWORD: decimal or 0x hex; SIZE: a number with an
optional K, M, G or T suffix";

impl OpKind {
    /// Whether the op carries `=BYTE`.
    pub fn takes_value(self) -> bool {
        !matches!(
            self,
            OpKind::Nop | OpKind::Shared | OpKind::Private | OpKind::CfgRead | OpKind::MmioRead
        )
    }

    /// Whether the value is a dword (configuration and MMIO ops) rather
    /// than a byte.
    pub fn dword_value(self) -> bool {
        self.is_cfg() || self.is_mmio()
    }

    /// `cfg-*`: `gpa` is the device number, `size` the register offset.
    pub fn is_cfg(self) -> bool {
        matches!(self, OpKind::CfgRead | OpKind::CfgWrite | OpKind::CfgCheck)
    }

    /// `mmio-*`: one dword at `gpa`, `size` is 4.
    pub fn is_mmio(self) -> bool {
        matches!(
            self,
            OpKind::MmioRead | OpKind::MmioWrite | OpKind::MmioCheck
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Nop => "nop",
            OpKind::Shared => "shared",
            OpKind::Private => "private",
            OpKind::Write => "write",
            OpKind::Wait => "wait",
            OpKind::DmaWrite => "dma-write",
            OpKind::DmaRead => "dma-read",
            OpKind::Check => "check",
            OpKind::BarWrite => "bar-write",
            OpKind::BarCheck => "bar-check",
            OpKind::CfgRead => "cfg-read",
            OpKind::CfgWrite => "cfg-write",
            OpKind::CfgCheck => "cfg-check",
            OpKind::MmioRead => "mmio-read",
            OpKind::MmioWrite => "mmio-write",
            OpKind::MmioCheck => "mmio-check",
        }
    }

    const ALL: [OpKind; 16] = [
        OpKind::Nop,
        OpKind::Shared,
        OpKind::Private,
        OpKind::Write,
        OpKind::Wait,
        OpKind::DmaWrite,
        OpKind::DmaRead,
        OpKind::Check,
        OpKind::BarWrite,
        OpKind::BarCheck,
        OpKind::CfgRead,
        OpKind::CfgWrite,
        OpKind::CfgCheck,
        OpKind::MmioRead,
        OpKind::MmioWrite,
        OpKind::MmioCheck,
    ];

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl OpKind {
    /// Doorbell command / op table code.
    pub fn code(self) -> u64 {
        match self {
            OpKind::Nop => 0,
            OpKind::Shared => 1,
            OpKind::Private => 2,
            OpKind::Write => 3,
            OpKind::Wait => 4,
            OpKind::DmaWrite => 5,
            OpKind::DmaRead => 6,
            OpKind::Check => 7,
            OpKind::BarWrite => 8,
            OpKind::BarCheck => 9,
            OpKind::CfgRead => 10,
            OpKind::CfgWrite => 11,
            OpKind::CfgCheck => 12,
            OpKind::MmioRead => 13,
            OpKind::MmioWrite => 14,
            OpKind::MmioCheck => 15,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    /// The device number for `cfg-*`.
    pub gpa: u64,
    /// The register's byte offset for `cfg-*`, 4 for `mmio-*`.
    pub size: u64,
    /// A byte, or a dword for `cfg-*` and `mmio-*`.
    pub value: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty op list")]
    Empty,
    #[error("op {0:?}: expected KIND@GPA+SIZE")]
    Shape(String),
    #[error("op {0:?}: unknown kind; the ops are:\n{SYNTAX}")]
    Kind(String),
    #[error(
        "op {0:?}: expected cfg-KIND@DEV:REG with DEV 0..=31 and REG a 4-aligned byte offset 0..=0xfc"
    )]
    CfgTarget(String),
    #[error("op {0:?}: expected mmio-KIND@GPA (one dword; no +SIZE)")]
    MmioShape(String),
    #[error(
        "op {0:?}: cfg-write, cfg-check, mmio-write and mmio-check need =DWORD (0..=0xffffffff)"
    )]
    DwordValue(String),
    #[error("invalid number {0:?}")]
    Number(String),
    #[error("invalid size {0:?} (a number with an optional K, M, G or T suffix)")]
    Size(String),
    #[error("op {0:?}: all but nop, shared and private need =BYTE (0..=255)")]
    WriteValue(String),
    #[error("op {0:?}: nop, shared, private, cfg-read and mmio-read take no =VALUE")]
    UnexpectedValue(String),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.name();
        if self.kind.is_cfg() {
            write!(f, "{kind}@{}:{:#x}", self.gpa, self.size)?;
        } else if self.kind.is_mmio() {
            write!(f, "{kind}@{:#x}", self.gpa)?;
        } else {
            write!(f, "{kind}@{:#x}+{:#x}", self.gpa, self.size)?;
        }
        if self.kind.takes_value() {
            write!(f, "={:#x}", self.value)?;
        }
        Ok(())
    }
}

/// Decimal or `0x` hexadecimal.
pub fn parse_u64(text: &str) -> Result<u64, ParseError> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    parsed.map_err(|_| ParseError::Number(text.to_string()))
}

/// A number with an optional binary suffix: `4096`, `0x1000`, `16K`, `2M`, `1G`, `16T`.
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let t = text.trim();
    let err = || ParseError::Size(text.to_string());
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        Some(_) => (t, 0),
        None => return Err(err()),
    };
    let base = parse_u64(digits).map_err(|_| err())?;
    base.checked_mul(1u64 << shift).ok_or_else(err)
}

fn parse_op(text: &str) -> Result<Op, ParseError> {
    let shape = || ParseError::Shape(text.to_string());
    let (kind, rest) = text.split_once('@').ok_or_else(shape)?;
    let kind = OpKind::from_name(kind.trim()).ok_or_else(|| ParseError::Kind(text.to_string()))?;
    let (target, value) = match rest.split_once('=') {
        Some((target, value)) => (target, Some(value)),
        None => (rest, None),
    };
    let value = match (kind.takes_value(), value) {
        (true, Some(v)) if kind.dword_value() => {
            u32::try_from(parse_u64(v)?).map_err(|_| ParseError::DwordValue(text.to_string()))?
        }
        (true, Some(v)) => u32::from(
            u8::try_from(parse_u64(v)?).map_err(|_| ParseError::WriteValue(text.to_string()))?,
        ),
        (true, None) if kind.dword_value() => {
            return Err(ParseError::DwordValue(text.to_string()));
        }
        (true, None) => return Err(ParseError::WriteValue(text.to_string())),
        (false, Some(_)) => return Err(ParseError::UnexpectedValue(text.to_string())),
        (false, None) => 0,
    };
    if kind.is_cfg() {
        // Mechanism #1 carries a 5-bit device number and a dword index
        // into the first 256 bytes: anything else cannot be encoded.
        let bad = || ParseError::CfgTarget(text.to_string());
        let (dev, reg) = target.split_once(':').ok_or_else(bad)?;
        let (dev, reg) = (parse_u64(dev)?, parse_u64(reg)?);
        if dev > 31 || reg > 0xfc || reg % 4 != 0 {
            return Err(bad());
        }
        return Ok(Op {
            kind,
            gpa: dev,
            size: reg,
            value,
        });
    }
    if kind.is_mmio() {
        if target.contains('+') {
            return Err(ParseError::MmioShape(text.to_string()));
        }
        return Ok(Op {
            kind,
            gpa: parse_u64(target)?,
            size: 4,
            value,
        });
    }
    let (gpa, size) = target.split_once('+').ok_or_else(shape)?;
    Ok(Op {
        kind,
        gpa: parse_u64(gpa)?,
        size: parse_size(size)?,
        value,
    })
}

pub fn parse_ops(text: &str) -> Result<Vec<Op>, ParseError> {
    if text.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    text.split(',').map(|op| parse_op(op.trim())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_example() {
        let ops = parse_ops("shared@0x200000+16K,private@0x201000+4K").unwrap();
        assert_eq!(
            ops,
            vec![
                Op {
                    kind: OpKind::Shared,
                    gpa: 0x20_0000,
                    size: 0x4000,
                    value: 0
                },
                Op {
                    kind: OpKind::Private,
                    gpa: 0x20_1000,
                    size: 0x1000,
                    value: 0
                },
            ]
        );
    }

    #[test]
    fn decimal_suffixes_and_writes() {
        let ops = parse_ops("shared@16777216+2M, write@0x1000000+1G=255").unwrap();
        assert_eq!(ops[0].gpa, 16 << 20);
        assert_eq!(ops[0].size, 2 << 20);
        assert_eq!(ops[1].kind, OpKind::Write);
        assert_eq!(ops[1].size, 1 << 30);
        assert_eq!(ops[1].value, 255);
        assert_eq!(parse_size("16T").unwrap(), 16 << 40);
    }

    #[test]
    fn bad_values_pass_through_unchanged() {
        let ops = parse_ops("shared@0x1001+0,private@0xffffffffffffffff+0x1000").unwrap();
        assert_eq!((ops[0].gpa, ops[0].size), (0x1001, 0));
        assert_eq!(ops[1].gpa, u64::MAX);
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert_eq!(parse_ops(""), Err(ParseError::Empty));
        assert!(matches!(parse_ops("shared"), Err(ParseError::Shape(_))));
        assert!(matches!(
            parse_ops("shared@0x1000"),
            Err(ParseError::Shape(_))
        ));
        assert!(matches!(
            parse_ops("swap@0x1000+4K"),
            Err(ParseError::Kind(_))
        ));
        assert!(matches!(
            parse_ops("shared@0xZZ+4K"),
            Err(ParseError::Number(_))
        ));
        assert!(matches!(
            parse_ops("shared@0x1000+4Q"),
            Err(ParseError::Size(_))
        ));
        assert!(matches!(
            parse_ops("shared@0x1000+99999999999T"),
            Err(ParseError::Size(_))
        ));
        assert!(matches!(
            parse_ops("write@0x1000+4K"),
            Err(ParseError::WriteValue(_))
        ));
        assert!(matches!(
            parse_ops("write@0x1000+4K=256"),
            Err(ParseError::WriteValue(_))
        ));
        assert!(matches!(
            parse_ops("shared@0x1000+4K=1"),
            Err(ParseError::UnexpectedValue(_))
        ));
    }

    #[test]
    fn configuration_and_mmio_ops_take_dwords() {
        let ops = parse_ops(
            "cfg-read@2:0x10, cfg-write@1:16=0xffffffff, cfg-check@31:0xfc=0, \
             mmio-read@0xfee00030, mmio-write@0xc0000010=3, mmio-check@0xc0000014=0xffffffff",
        )
        .unwrap();
        assert_eq!(
            ops[0],
            Op {
                kind: OpKind::CfgRead,
                gpa: 2,
                size: 0x10,
                value: 0
            }
        );
        assert_eq!((ops[1].gpa, ops[1].size, ops[1].value), (1, 0x10, u32::MAX));
        assert_eq!((ops[2].gpa, ops[2].size), (31, 0xfc));
        assert_eq!(
            (ops[3].kind, ops[3].gpa, ops[3].size),
            (OpKind::MmioRead, 0xfee0_0030, 4)
        );
        assert_eq!(ops[4].value, 3);
        assert_eq!(ops[5].value, u32::MAX);
        // Codes follow the assembly's table of kind names.
        let codes: Vec<u64> = OpKind::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(codes, (0..16).collect::<Vec<u64>>());
    }

    #[test]
    fn configuration_and_mmio_errors_are_reported() {
        for bad in [
            "cfg-read@32:0",
            "cfg-read@1:0x100",
            "cfg-read@1:0x12",
            "cfg-read@1",
        ] {
            assert!(
                matches!(parse_ops(bad), Err(ParseError::CfgTarget(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_ops("cfg-read@x:0"),
            Err(ParseError::Number(_))
        ));
        assert!(matches!(
            parse_ops("cfg-write@1:0x10"),
            Err(ParseError::DwordValue(_))
        ));
        assert!(matches!(
            parse_ops("cfg-write@1:0x10=0x100000000"),
            Err(ParseError::DwordValue(_))
        ));
        assert!(matches!(
            parse_ops("cfg-read@1:0x10=1"),
            Err(ParseError::UnexpectedValue(_))
        ));
        assert!(matches!(
            parse_ops("mmio-read@0x1000+4"),
            Err(ParseError::MmioShape(_))
        ));
        assert!(matches!(
            parse_ops("mmio-check@0x1000"),
            Err(ParseError::DwordValue(_))
        ));
        // A byte op still refuses a dword.
        assert!(matches!(
            parse_ops("write@0x1000000+4=0x1ff"),
            Err(ParseError::WriteValue(_))
        ));
        // The unknown-kind error lists every op.
        let message = parse_ops("cfg-poke@1:0").unwrap_err().to_string();
        for kind in OpKind::ALL {
            assert!(message.contains(&format!("{}@", kind.name())), "{message}");
        }
    }

    #[test]
    fn the_syntax_lists_every_op() {
        for kind in OpKind::ALL {
            assert!(
                SYNTAX.contains(&format!("\n{}@", kind.name()))
                    || SYNTAX.starts_with(&format!("{}@", kind.name())),
                "{}",
                kind.name()
            );
        }
    }

    #[test]
    fn display_round_trips() {
        let text = "shared@0x1000000+0x4000,write@0x1000000+0x10=0xab,\
                    cfg-write@1:0x10=0xc0000000,cfg-read@2:0x4,mmio-check@0xc0000014=0xffffffff";
        let ops = parse_ops(text).unwrap();
        let again: Vec<String> = ops.iter().map(Op::to_string).collect();
        assert_eq!(again.join(","), text);
    }
}
