"""One definition per op, bound twice: its forward and backward kernels (device-agnostic functions of tensors)
and its autograd formula become a torch.library custom operator volconv::NAME with volconv::NAME_backward (what
torch.compile and torch.export see) and an eager torch.autograd.Function over the very same functions.

Why two bindings: a custom operator's eager dispatch costs about 200 us a call, 3x what the Function costs
(measured on 8^3 conv3d, 2026-11-29), so eager calls skip the dispatcher; traced calls need the operator."""
import torch

from .common import compiling


class Op:
    """forward(*args) -> Tensor and backward(grad, ...) -> gradients: the kernels, annotated for the operator's
    schema; forward_fake / backward_fake: their output shapes; setup(ctx, inputs, output) and
    gradient(ctx, grad) -> one gradient per input: the autograd formula, which runs the backward kernel as
    ctx.kernel (the custom operator while tracing, the plain function in eager calls; ctx.traced says which).
    setup never reads the output (the eager binding runs it before the forward)."""

    def __init__(self, name, forward, forward_fake, backward, backward_fake, setup, gradient):
        self.traced = torch.library.custom_op(f"volconv::{name}", mutates_args=())(forward)
        self.traced.register_fake(forward_fake)
        self.traced_backward = torch.library.custom_op(f"volconv::{name}_backward", mutates_args=())(backward)
        self.traced_backward.register_fake(backward_fake)

        def traced_setup(ctx, inputs, output):
            ctx.kernel, ctx.traced = self.traced_backward, True
            setup(ctx, inputs, output)

        self.traced.register_autograd(gradient, setup_context=traced_setup)

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):   # (ctx first: a separate setup_context costs an inspect.signature a call)
                ctx.kernel, ctx.traced = backward, False
                setup(ctx, inputs, None)
                return forward(*inputs)

            @staticmethod
            def backward(ctx, grad):
                return gradient(ctx, grad)

        Eager.__name__ = Eager.__qualname__ = f"{name}_function"
        self.eager = Eager

    def __call__(self, *args):
        return self.traced(*args) if compiling() else self.eager.apply(*args)
