/*
 * memconv: a tiny 64-bit ring-0 test guest. It walks the op table that
 * ch-testguest appends to this image, asks the conversion doorbell to
 * convert ranges (or fills memory itself), and prints one line per op
 * (only the summary line when the table's QUIET flag is set).
 *
 * Entry state (set up by the VMM, see docs/test-guest.md):
 *   long mode, identity-mapped page tables, interrupts off,
 *   rdi = RAM size in bytes, rsi = vCPU index, rdx = vCPU count,
 *   rsp = top of this vCPU's stack.
 *
 * Register use in the main loop (preserved by the print helpers):
 *   rbx = current op, r12 = ops left, r13 = ok, r14 = failed,
 *   r15 = RAM size, rbp = vCPU index, r10 = op index, r11 = doorbell bank.
 */
    .intel_syntax noprefix
    .code64

    .set SERIAL_PORT, 0x3f8
    .set EXIT_PORT, 0xf4
    .set DOORBELL_BASE, 0x600
    .set DOORBELL_BANK_SHIFT, 5
    .set OP_WRITE, 3
    .set OP_WAIT, 4
    .set OP_DMA_WRITE, 5
    .set OP_DMA_READ, 6
    .set OP_CHECK, 7
    .set OP_BAR_WRITE, 8
    .set OP_BAR_CHECK, 9
    .set OP_CFG_READ, 10        /* cfg-read, cfg-write, cfg-check */
    .set OP_MMIO_READ, 13       /* mmio-read, mmio-write, mmio-check */
    .set OP_LAST, 15
    .set BAR0_SIZE, 0x2000
    .set STATUS_OUT_OF_RANGE, 2
    .set STATUS_DMA_FAULT, 7
    .set STATUS_MISMATCH, 8
    .set STATUS_NO_DEVICE, 9
    .set STATUS_DEVICE_ERROR, 10
    .set GUEST_FLOOR, 0x1000000
    .set FLAG_POWEROFF, 1
    .set FLAG_QUIET, 2
    .set STATUS_NAMES, 11
    .set KIND_NAMES, 17     /* nop .. mmio-check, unknown */
    .set FOUR_GIB, 0x100000000

    /* PCI: the test device (docs/test-guest.md) and its DMA engine. */
    .set PCI_ADDRESS_PORT, 0xcf8
    .set PCI_DATA_PORT, 0xcfc
    .set TEST_DEVICE_IDS, 0xd3a0c0de
    .set TEST_DEVICE_MSIX_CAP, 0x40
    .set DMA_IOVA_LO, 0x00
    .set DMA_IOVA_HI, 0x04
    .set DMA_LENGTH, 0x08
    .set DMA_VALUE, 0x0c
    .set DMA_COMMAND, 0x10
    .set DMA_STATUS, 0x14
    .set MSIX_TABLE, 0x800
    .set MSIX_VECTOR, 0x40
    .set LAPIC_EOI, 0xfee000b0
    .set LAPIC_SVR, 0xfee000f0
    .set SPIN_FOR_IRQS, 200000

/* Repeated sequences, written once. */

/* rsi = a range's start, rcx = its size, eax = STATUS_OUT_OF_RANGE: to
 * op_result unless the range ends at or below `limit`. Leaves rsi at the
 * range's end. */
.macro END_WITHIN limit
    add rsi, rcx
    jc op_result
    cmp rsi, \limit
    ja op_result
.endm

/* rdi = the op's GPA, rcx = its size; to op_result with eax =
 * STATUS_OUT_OF_RANGE unless the range lies in guest RAM above
 * GUEST_FLOOR. Clobbers rsi. */
.macro GUEST_RAM_RANGE
    mov rdi, [rbx + 8]
    mov rcx, [rbx + 16]
    mov eax, STATUS_OUT_OF_RANGE
    cmp rdi, GUEST_FLOOR
    jb op_result
    mov rsi, rdi
    END_WITHIN r15
.endm

/* Selects dword `reg` of bus 0 device r8d in the PCI address register;
 * the data port is next. Clobbers eax, dx. */
.macro PCI_SELECT reg
    mov eax, r8d
    shl eax, 11
    or eax, 0x80000000 | \reg
    mov dx, PCI_ADDRESS_PORT
    out dx, eax
.endm

/* Prints the string at `label`, then rax loaded from `value` with
 * `print` (put_dec or put_hex). */
.macro PUT_FIELD label, value, print=put_dec
    lea rsi, [rip + \label]
    call puts
    mov rax, \value
    call \print
.endm

/* A spin lock on the dword at `flag`: `lock` takes it, `unlock` frees it. */
.macro SPIN_LOCK flag
    mov eax, 1
1:  xchg eax, [rip + \flag]
    test eax, eax
    jz 2f
    pause
    mov eax, 1
    jmp 1b
2:  ret
.endm

.macro SPIN_UNLOCK flag
    mov dword ptr [rip + \flag], 0
    ret
.endm

    .section .text
    .globl _start
_start:
    cli
    cld
    mov r15, rdi
    mov rbp, rsi
    mov r11, rsi
    shl r11, DOORBELL_BANK_SHIFT
    add r11, DOORBELL_BASE

    /* vCPU 0 takes the test device's MSI-X interrupts. */
    test rbp, rbp
    jnz 1f
    call setup_interrupts
1:
    lea rbx, [rip + optable]
    mov rax, [rbx]
    movabs rcx, 0x31564e4f434d454d      /* "MEMCONV1" */
    cmp rax, rcx
    jne bad_table

    /* Only min(lists, vCPUs) vCPUs have work; the last one reports. */
    mov rax, [rbx + 16]
    cmp rax, rdx
    cmova rax, rdx
    mov [rip + expected_cpus], rax
    cmp rbp, rax
    jae idle

    mov rcx, rbp
    shl rcx, 4
    mov r12, [rbx + rcx + 32]
    add rbx, [rbx + rcx + 24]
    xor r13d, r13d
    xor r14d, r14d
    xor r10d, r10d

next_op:
    test r12, r12
    jz cpu_done

    mov rax, [rbx]
    cmp rax, OP_WRITE
    je do_write
    cmp rax, OP_WAIT
    je do_wait
    cmp rax, OP_DMA_WRITE
    je do_dma
    cmp rax, OP_DMA_READ
    je do_dma
    cmp rax, OP_CHECK
    je do_check
    cmp rax, OP_BAR_WRITE
    je do_bar
    cmp rax, OP_BAR_CHECK
    je do_bar
    cmp rax, OP_LAST
    ja 1f
    cmp rax, OP_MMIO_READ
    jae do_mmio
    cmp rax, OP_CFG_READ
    jae do_cfg
1:

    /* Doorbell: GPA and size as 32-bit halves, then the command. */
    mov rdx, r11
    mov rax, [rbx + 8]
    out dx, eax
    shr rax, 32
    add edx, 4
    out dx, eax
    mov rax, [rbx + 16]
    add edx, 4
    out dx, eax
    shr rax, 32
    add edx, 4
    out dx, eax
    mov rax, [rbx]
    add edx, 4
    out dx, eax
    add edx, 4
    in eax, dx
    jmp op_result

do_write:
    GUEST_RAM_RANGE
    movzx eax, byte ptr [rbx + 24]
    movabs rdx, 0x0101010101010101
    imul rax, rdx
    mov rsi, rcx
    shr rcx, 3
    rep stosq
    mov rcx, rsi
    and rcx, 7
    rep stosb
    xor eax, eax

    jmp op_result

/* The guest compares its own memory with the op's byte. */
do_check:
    GUEST_RAM_RANGE
    xor edx, edx
    test rcx, rcx
    jz 1f
    mov al, [rbx + 24]
    repe scasb
    je 1f
    mov edx, STATUS_MISMATCH
1:  mov eax, edx
    jmp op_result

/* The test device fills (dma-write) or compares (dma-read) the range by
 * DMA; one vCPU drives its registers at a time. */
do_dma:
    call device_lock
    call find_device
    test rax, rax
    jnz 1f
    call device_unlock
    mov eax, STATUS_NO_DEVICE
    jmp op_result
1:  mov rdi, rax
    mov rax, [rbx + 8]
    mov [rdi + DMA_IOVA_LO], eax
    shr rax, 32
    mov [rdi + DMA_IOVA_HI], eax
    mov rax, [rbx + 16]
    mov [rdi + DMA_LENGTH], eax
    movzx eax, byte ptr [rbx + 24]
    mov [rdi + DMA_VALUE], eax
    mov rax, [rbx]
    sub eax, OP_DMA_WRITE - 1           /* 1 fill, 2 verify */
    mov [rdi + DMA_COMMAND], eax
    lock inc qword ptr [rip + dma_ops]
    mov eax, [rdi + DMA_STATUS]
    mov edx, STATUS_NO_DEVICE
    cmp eax, 0xffffffff                 /* gone: look again next time */
    jne 2f
    mov qword ptr [rip + device_bar0], 0
    jmp 3f
2:  xor edx, edx
    test eax, eax
    jz 3f
    mov edx, STATUS_DMA_FAULT
    cmp eax, 1
    je 3f
    mov edx, STATUS_MISMATCH
    cmp eax, 2
    je 3f
    mov edx, STATUS_DEVICE_ERROR
3:  call device_unlock
    mov eax, edx
    jmp op_result

/* The guest itself stores (bar-write) or compares (bar-check) bytes of the
 * test device's BAR0 at offset GPA, one byte access at a time: trapped and
 * forwarded, or straight to the device's memory where the VMM mapped it. */
do_bar:
    mov rcx, [rbx + 16]
    mov rsi, [rbx + 8]
    mov eax, STATUS_OUT_OF_RANGE
    END_WITHIN BAR0_SIZE
    call device_lock
    call find_device
    mov edx, STATUS_NO_DEVICE
    test rax, rax
    jz 3f
    mov rdi, rax
    add rdi, [rbx + 8]
    mov rcx, [rbx + 16]
    mov r8b, [rbx + 24]
    xor edx, edx
    cmp qword ptr [rbx], OP_BAR_WRITE
    jne 2f
1:  test rcx, rcx
    jz 3f
    mov [rdi], r8b
    inc rdi
    dec rcx
    jmp 1b
2:  test rcx, rcx
    jz 3f
    mov al, [rdi]
    cmp al, r8b
    jne 4f
    inc rdi
    dec rcx
    jmp 2b
4:  mov edx, STATUS_MISMATCH
3:  call device_unlock
    mov eax, edx
    jmp op_result

/* cfg-read / cfg-write / cfg-check: one dword of bus 0 device GPA at byte
 * offset SIZE, through ports 0xCF8/0xCFC (under the device lock: the
 * address register is one for the whole VM). A write forgets the cached
 * BAR0, so the next dma/bar op scans again and finds BAR0 where the guest
 * moved it. */
do_cfg:
    call device_lock
    mov eax, [rbx + 8]
    shl eax, 11
    or eax, [rbx + 16]
    or eax, 0x80000000
    mov dx, PCI_ADDRESS_PORT
    out dx, eax
    mov dx, PCI_DATA_PORT
    mov rcx, [rbx]
    sub rcx, OP_CFG_READ
    cmp rcx, 1
    jne 1f
    mov eax, [rbx + 24]
    out dx, eax
    mov qword ptr [rip + device_bar0], 0
    xor edx, edx
    jmp 3f
1:  in eax, dx
    jmp dword_read

/* mmio-read / mmio-write / mmio-check: one dword access at GPA, which may
 * be RAM, a BAR, ECAM, the LAPIC... anything in the identity map (RAM and
 * the first 4 GiB); beyond it the access would fault, so out-of-range. */
do_mmio:
    lea rsi, [rip + last_read]
    mov qword ptr [rsi + rbp * 8], 0
    mov rdi, [rbx + 8]
    mov rsi, rdi
    add rsi, 4
    mov eax, STATUS_OUT_OF_RANGE
    jc op_result
    movabs rcx, FOUR_GIB
    cmp rcx, r15
    cmovb rcx, r15
    cmp rsi, rcx
    ja op_result
    call device_lock
    mov rcx, [rbx]
    sub rcx, OP_MMIO_READ
    cmp rcx, 1
    jne 1f
    mov eax, [rbx + 24]
    mov [rdi], eax
    xor edx, edx
    jmp 3f
1:  mov eax, [rdi]

/* eax: the dword a read or check op loaded; rcx: 0 read, 2 check. Kept
 * per vCPU for the op's line. */
dword_read:
    lea rsi, [rip + last_read]
    mov [rsi + rbp * 8], rax
    xor edx, edx
    cmp rcx, 2
    jne 3f
    cmp eax, [rbx + 24]
    je 3f
    mov edx, STATUS_MISMATCH
3:  call device_unlock
    mov eax, edx
    jmp op_result

/* Spin until a device stores the op's byte at its GPA. */
do_wait:
    mov rdi, [rbx + 8]
    mov eax, STATUS_OUT_OF_RANGE
    cmp rdi, GUEST_FLOOR
    jb op_result
    cmp rdi, r15
    jae op_result
    mov cl, [rbx + 24]
1:  cmp [rdi], cl
    je 2f
    pause
    jmp 1b
2:  xor eax, eax

op_result:
    test eax, eax
    jnz 1f
    inc r13
    jmp 2f
1:  inc r14
2:  test qword ptr [rip + optable + 8], FLAG_QUIET
    jnz op_next
    push rax
    call console_lock
    PUT_FIELD s_cpu, rbp
    PUT_FIELD s_op, r10
    mov al, ' '
    call putc
    mov rax, [rbx]
    cmp rax, KIND_NAMES - 1
    jb 3f
    mov eax, KIND_NAMES - 1
3:  lea rsi, [rip + kind_names]
    mov rsi, [rsi + rax * 8]
    call puts
    mov rax, [rbx]
    cmp rax, OP_CFG_READ
    jb 7f
    cmp rax, OP_LAST
    ja 7f
    call put_dword_op
    jmp 4f
7:  PUT_FIELD s_gpa, "[rbx + 8]", put_hex
    PUT_FIELD s_size, "[rbx + 16]", put_hex
    cmp qword ptr [rbx], OP_WRITE       /* write and every kind after it */
    jb 4f
    lea rsi, [rip + s_value]
    call puts
    movzx eax, byte ptr [rbx + 24]
    call put_hex
4:  lea rsi, [rip + s_status]
    call puts
    pop rax
    cmp rax, STATUS_NAMES
    jae 5f
    lea rsi, [rip + status_names]
    mov rsi, [rsi + rax * 8]
    call puts
    jmp 6f
5:  lea rsi, [rip + s_error]
    call puts
    call put_dec
    mov al, ')'
    call putc
6:  mov al, '\n'
    call putc
    call console_unlock

op_next:
    add rbx, 32
    dec r12
    inc r10
    jmp next_op

cpu_done:
    lock add [rip + total_ok], r13
    lock add [rip + total_failed], r14
    mov eax, 1
    lock xadd [rip + done_cpus], rax
    inc rax
    cmp rax, [rip + expected_cpus]
    jne idle
    call report_interrupts
    call console_lock
    PUT_FIELD s_done, "[rip + total_ok]"
    PUT_FIELD s_ok, "[rip + total_failed]"
    lea rsi, [rip + s_failed]
    call puts
    call console_unlock
    lea rbx, [rip + optable]
    test qword ptr [rbx + 8], FLAG_POWEROFF
    jz idle
    mov dx, EXIT_PORT
    xor eax, eax
    out dx, al

idle:
    hlt
    jmp idle

bad_table:
    lea rsi, [rip + s_bad_table]
    call puts
    jmp idle

/* --- helpers: clobber rax, rcx, rdx, rsi, rdi, r8, r9 only --- */

/* The middle of a cfg-* or mmio-* op's line: "dev=N reg=0x.." or
 * "gpa=0x..", then "value=" (what was written, or what a read loaded) and
 * for a check "value=EXPECTED read=LOADED". */
put_dword_op:
    cmp qword ptr [rbx], OP_MMIO_READ
    jae 1f
    PUT_FIELD s_dev, "[rbx + 8]"
    PUT_FIELD s_reg, "[rbx + 16]", put_hex
    jmp 2f
1:  PUT_FIELD s_gpa, "[rbx + 8]", put_hex
2:  lea rsi, [rip + s_value]
    call puts
    mov rax, [rbx]
    sub rax, OP_CFG_READ
    cmp rax, 3
    jb 3f
    sub rax, 3
3:  lea rsi, [rip + last_read]
    mov r9, [rsi + rbp * 8]
    test rax, rax               /* read: the loaded dword */
    jz 4f
    push rax
    mov eax, [rbx + 24]
    push r9
    call put_hex
    pop r9
    pop rax
    cmp rax, 2
    jne 5f
    lea rsi, [rip + s_read]
    call puts
4:  mov eax, r9d
    call put_hex
5:  ret

/* Returns the test device's BAR0 in rax (0: not on the bus). The first
 * time: scans bus 0 through ports 0xCF8/0xCFC, enables memory decoding
 * and bus mastering, and points MSI-X vector 0 at vCPU 0. */
find_device:
    mov rax, [rip + device_bar0]
    test rax, rax
    jnz 9f
    xor r8d, r8d
1:  PCI_SELECT 0
    mov dx, PCI_DATA_PORT
    in eax, dx
    cmp eax, TEST_DEVICE_IDS
    je 2f
    inc r8d
    cmp r8d, 32
    jb 1b
    xor eax, eax
    ret
2:  PCI_SELECT 0x10                     /* BAR0 */
    mov dx, PCI_DATA_PORT
    in eax, dx
    and eax, 0xfffffff0
    mov r9, rax
    PCI_SELECT 0x04                     /* command: memory + bus master */
    mov dx, PCI_DATA_PORT
    mov ax, 6
    out dx, ax
    /* The table is in BAR0: reachable once memory decoding is on. */
    mov dword ptr [r9 + MSIX_TABLE], 0xfee00000
    mov dword ptr [r9 + MSIX_TABLE + 4], 0
    mov dword ptr [r9 + MSIX_TABLE + 8], MSIX_VECTOR
    PCI_SELECT TEST_DEVICE_MSIX_CAP     /* MSI-X message control: enable */
    mov dx, PCI_DATA_PORT + 2
    mov ax, 0x8000
    out dx, ax
    /* Unmask vector 0 last, once MSI-X is on. */
    mov dword ptr [r9 + MSIX_TABLE + 12], 0
    mov [rip + device_bar0], r9
    mov rax, r9
9:  ret

device_lock:
    SPIN_LOCK device_busy

device_unlock:
    SPIN_UNLOCK device_busy

/* vCPU 0: an IDT whose vectors 0x20.. acknowledge the LAPIC and return
 * (MSIX_VECTOR also counts), the LAPIC software-enabled, interrupts on. */
setup_interrupts:
    lea rdi, [rip + idt]
    mov ecx, 0x20
1:  lea rsi, [rip + irq_other]
    cmp ecx, MSIX_VECTOR
    jne 2f
    lea rsi, [rip + irq_msix]
2:  mov rdx, rcx
    shl rdx, 4
    mov [rdi + rdx], si
    mov word ptr [rdi + rdx + 2], 0x08
    mov word ptr [rdi + rdx + 4], 0x8e00
    mov r8, rsi
    shr r8, 16
    mov [rdi + rdx + 6], r8w
    shr r8, 16
    mov [rdi + rdx + 8], r8d
    mov dword ptr [rdi + rdx + 12], 0
    inc ecx
    cmp ecx, 256
    jb 1b
    lidt [rip + idt_descriptor]
    mov eax, LAPIC_SVR
    mov dword ptr [rax], 0x1ff
    sti
    ret

irq_msix:
    lock inc qword ptr [rip + msix_irqs]
irq_other:
    push rax
    mov eax, LAPIC_EOI
    mov dword ptr [rax], 0
    pop rax
    iretq

/* Before the summary: if the device ran commands, give their MSI-X
 * interrupts a moment to land, then print how many did. */
report_interrupts:
    mov rax, [rip + dma_ops]
    test rax, rax
    jz 3f
    mov ecx, SPIN_FOR_IRQS
1:  mov rax, [rip + msix_irqs]
    cmp rax, [rip + dma_ops]
    jae 2f
    pause
    dec ecx
    jnz 1b
2:  call console_lock
    PUT_FIELD s_dma_ops, "[rip + dma_ops]"
    PUT_FIELD s_msix, "[rip + msix_irqs]"
    mov al, '\n'
    call putc
    call console_unlock
3:  ret

putc:
    mov dx, SERIAL_PORT
    out dx, al
    ret

puts:
    mov dx, SERIAL_PORT
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  ret

/* rax: printed as 0x-prefixed hex without leading zeros */
put_hex:
    mov r8, rax
    mov dx, SERIAL_PORT
    mov al, '0'
    out dx, al
    mov al, 'x'
    out dx, al
    mov ecx, 60
    xor r9d, r9d
1:  mov rax, r8
    shr rax, cl
    and eax, 0xf
    test r9d, r9d
    jnz 2f
    test eax, eax
    jnz 2f
    test ecx, ecx
    jz 2f
    jmp 3f
2:  mov r9d, 1
    lea rsi, [rip + hex_digits]
    mov al, [rsi + rax]
    out dx, al
3:  sub ecx, 4
    jns 1b
    ret

/* rax: printed in decimal */
put_dec:
    sub rsp, 32
    lea rdi, [rsp + 31]
    mov byte ptr [rdi], 0
    mov rcx, 10
1:  xor edx, edx
    div rcx
    add dl, '0'
    dec rdi
    mov [rdi], dl
    test rax, rax
    jnz 1b
    mov rsi, rdi
    call puts
    add rsp, 32
    ret

/* One console line at a time across vCPUs. */
console_lock:
    SPIN_LOCK console_busy

console_unlock:
    SPIN_UNLOCK console_busy

hex_digits:   .ascii "0123456789abcdef"
s_cpu:        .asciz "memconv: cpu"
s_op:         .asciz " op "
s_gpa:        .asciz " gpa="
s_size:       .asciz " size="
s_value:      .asciz " value="
s_dev:        .asciz " dev="
s_reg:        .asciz " reg="
s_read:       .asciz " read="
s_status:     .asciz " status="
s_error:      .asciz "error("
s_done:       .asciz "memconv: done "
s_ok:         .asciz " ok "
s_failed:     .asciz " failed\n"
s_bad_table:  .asciz "memconv: bad op table\n"
k_nop:        .asciz "nop"
k_unknown:    .asciz "unknown"
k_shared:     .asciz "shared"
k_private:    .asciz "private"
k_write:      .asciz "write"
k_wait:       .asciz "wait"
k_dma_write:  .asciz "dma-write"
k_dma_read:   .asciz "dma-read"
k_check:      .asciz "check"
k_bar_write:  .asciz "bar-write"
k_bar_check:  .asciz "bar-check"
k_cfg_read:   .asciz "cfg-read"
k_cfg_write:  .asciz "cfg-write"
k_cfg_check:  .asciz "cfg-check"
k_mmio_read:  .asciz "mmio-read"
k_mmio_write: .asciz "mmio-write"
k_mmio_check: .asciz "mmio-check"
s_dma_ops:    .asciz "memconv: dma ops "
s_msix:       .asciz " msix interrupts "
st_ok:        .asciz "ok"
st_invalid:   .asciz "invalid"
st_range:     .asciz "out-of-range"
st_listener:  .asciz "listener-failed"
st_hv:        .asciz "hypervisor-error"
st_command:   .asciz "bad-command"
st_busy:      .asciz "busy"
st_dma_fault: .asciz "dma-fault"
st_mismatch:  .asciz "mismatch"
st_no_device: .asciz "no-device"
st_dev_error: .asciz "device-error"

    .balign 8
kind_names:   .quad k_nop, k_shared, k_private, k_write, k_wait, k_dma_write, k_dma_read, k_check, k_bar_write, k_bar_check
              .quad k_cfg_read, k_cfg_write, k_cfg_check, k_mmio_read, k_mmio_write, k_mmio_check, k_unknown
status_names: .quad st_ok, st_invalid, st_range, st_listener, st_hv, st_command, st_busy, st_dma_fault, st_mismatch, st_no_device, st_dev_error
console_busy: .quad 0
expected_cpus: .quad 0
done_cpus:    .quad 0
total_ok:     .quad 0
total_failed: .quad 0
device_bar0:  .quad 0
device_busy:  .quad 0
dma_ops:      .quad 0
msix_irqs:    .quad 0
last_read:    .space 8 * 32     /* per vCPU: the dword the last read loaded */
idt_descriptor:
    .word 256 * 16 - 1
    .quad idt
    .balign 16
idt:          .space 256 * 16
    .balign 8
optable:
