import torch

from kdgate.distill.nets import count_parameters, student_mlp, teacher_cnn


def test_sizes_and_shapes() -> None:
    teacher, student = teacher_cnn(), student_mlp()
    assert count_parameters(student) == 64 * 64 + 64 + 64 * 10 + 10
    assert 140_000 <= count_parameters(teacher) <= 160_000
    assert count_parameters(teacher) >= 5 * count_parameters(student)
    x = torch.rand(3, 64) * 16
    assert teacher.eval()(x).shape == (3, 10)
    assert student(x).shape == (3, 10)


def test_scaling_is_inside_the_network() -> None:
    # The first layer divides by 16: raw pixels in, the same as scaled pixels into the rest.
    student = student_mlp()
    x = torch.rand(4, 64) * 16
    torch.testing.assert_close(student(x), student[1:](x / 16.0))
