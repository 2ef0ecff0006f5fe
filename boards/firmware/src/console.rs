//! The console: a UART behind a lock (a PL011 through `arm-pl011-uart`, or an NXP LPUART), `print!`/`println!`
//! macros and a `log` backend writing to it.
//!
//! The LPUART is written here: no maintained crate drives it outside i.MX RT microcontroller HALs (Cortex-M
//! register crates chosen by chip feature), and the console needs two of its registers. It writes to a UART the
//! boot loader set up (U-Boot has, at 115200 8N1), as Linux's earlycon does; it never reprograms the baud rate.

use core::fmt::{self, Write};
use core::ptr::NonNull;

use arm_pl011_uart::{PL011Registers, Uart, UniqueMmioPointer};
use spin::mutex::SpinMutex;

use crate::dt::UartKind;

static CONSOLE: SpinMutex<Option<Console>> = SpinMutex::new(None);

/// The UART the console writes to.
enum Console {
    Pl011(Uart<'static>),
    Lpuart(Lpuart),
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match self {
            Console::Pl011(uart) => uart.write_str(s),
            Console::Lpuart(uart) => uart.write_str(s),
        }
    }
}

/// An NXP 32-bit LPUART (`fsl,imx7ulp-lpuart` family), transmit only. Register offsets and bits as Linux's
/// `fsl_lpuart` driver and Xen's i.MX LPUART driver use them (the i.MX reference manuals' LPUART chapter).
struct Lpuart {
    base: usize,
}

impl Lpuart {
    /// Status register.
    const STAT: usize = 0x14;
    /// Data register: a write queues one character.
    const DATA: usize = 0x1c;
    /// STAT: the transmit buffer has room.
    const STAT_TDRE: u32 = 1 << 23;
    /// STAT: transmission complete (the FIFO and the shift register empty, the line idle).
    const STAT_TC: u32 = 1 << 22;

    fn idle(&self) -> bool {
        // SAFETY: as in `put`.
        unsafe { ((self.base + Self::STAT) as *const u32).read_volatile() & Self::STAT_TC != 0 }
    }

    fn put(&mut self, byte: u8) {
        // SAFETY: `init`'s contract: the LPUART's registers are mapped as device memory and only the console
        // drives it; STAT and DATA are 32-bit registers.
        unsafe {
            while ((self.base + Self::STAT) as *const u32).read_volatile() & Self::STAT_TDRE == 0 {
                core::hint::spin_loop();
            }
            ((self.base + Self::DATA) as *mut u32).write_volatile(u32::from(byte));
        }
    }
}

impl Write for Lpuart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.put(b'\r');
            }
            self.put(byte);
        }
        Ok(())
    }
}

/// Takes the UART of `kind` at `base` as the console and installs the `log` backend.
///
/// # Safety
/// `base` must be the address of that UART's registers, mapped as device memory for as long as the program runs,
/// and nothing else may drive that UART.
pub unsafe fn init(kind: UartKind, base: usize) {
    let console = match kind {
        UartKind::Pl011 => {
            let Some(regs) = NonNull::new(base as *mut PL011Registers) else {
                return;
            };
            // SAFETY: the caller guarantees a mapped PL011 that only the console uses.
            Console::Pl011(Uart::new(unsafe { UniqueMmioPointer::new(regs) }))
        }
        UartKind::Lpuart => Console::Lpuart(Lpuart { base }),
    };
    *CONSOLE.lock() = Some(console);
    // A second `init` keeps the first logger, which writes to the same console.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Waits until the console's UART has sent everything written to it (at most 20 ms, 240 characters at 115200
/// baud, so a UART whose clock was stopped cannot hang the caller): before a reset or a power-off, which would cut
/// the last lines off in the FIFO.
pub fn flush() {
    let guard = CONSOLE.lock();
    let Some(console) = &*guard else {
        return;
    };
    // From when this CPU holds the console: another's line finished first.
    let deadline = crate::time::deadline_us(20_000);
    let idle = || match console {
        Console::Pl011(uart) => !uart.is_busy(),
        Console::Lpuart(uart) => uart.idle(),
    };
    while !idle() && !crate::time::expired(deadline) {
        core::hint::spin_loop();
    }
}

/// Writes formatted text to the console; silently drops it when no console is set up yet.
pub fn write_fmt(args: fmt::Arguments) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        let _ = uart.write_fmt(args);
    }
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::write_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        write_fmt(format_args!("[{:5}] {}\n", record.level(), record.args()));
    }

    fn flush(&self) {}
}
